"""Writing models: `save_compressed` (a model in the format that expresses it) and the final export folder verified in
a fresh process, with its record, model card and Hub upload (`export_model`, told what produced the model by a
`Provenance`: plain data, no recipe)."""

from .card import render_model_card
from .compressed import save_compressed
from .hub import push_export
from .record import Provenance, read_export_record
from .save import ExportConfig, HubPushConfig, export_model

__all__ = ["ExportConfig", "HubPushConfig", "Provenance", "export_model", "push_export", "read_export_record",
           "render_model_card", "save_compressed"]
