"""Writing the final model, verified in a fresh process, with its record, model card and Hub upload."""

from .card import render_model_card
from .formats import ExportFormat, detect_format, load_exported, register_export_format
from .save import ExportConfig, HubPushConfig, export_model, export_stage, read_export_record

__all__ = ["ExportConfig", "ExportFormat", "HubPushConfig", "detect_format", "export_model", "export_stage",
           "load_exported", "read_export_record", "register_export_format", "render_model_card"]
