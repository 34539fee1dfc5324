"""Writing the final model, its resolved recipe, metrics and model card."""

from .card import render_model_card
from .save import ExportConfig, export_stage

__all__ = ["ExportConfig", "export_stage", "render_model_card"]
