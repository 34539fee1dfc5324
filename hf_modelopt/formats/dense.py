"""Plain safetensors: what `save_pretrained` writes for a model no other format holds (fine-tuned, distilled, pruned
with zeros in dense weights, GGUF dequantized); plain transformers loads it."""

from __future__ import annotations

from pathlib import Path

from .export_format import ExportFormat, save_pretrained_with_tokenizer

EXPORT_FORMAT = ExportFormat(
    "dense", "transformers", lambda folder: (Path(folder) / "config.json").is_file(), "plain safetensors weights",
    holds=lambda model: True,  # the last format tried: every model can be saved this way
    write=save_pretrained_with_tokenizer,
)
