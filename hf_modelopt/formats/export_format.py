"""`ExportFormat`: what one on-disk format declares to the registry (`detect.py`): how to recognise a saved folder,
what must be imported to load it, and, for a format a model can be in while in memory, how to write that model.

Every format module (`adapters.py`, `hf_modelopt.py`, `compressed_tensors.py`, `bitsandbytes.py`, `dense.py`)
declares one (or two) of these; `detect.EXPORT_FORMATS` lists them in the order they are tried.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOADERS = ("transformers", "hf_modelopt", "peft")

# `write(model, folder, tokenizer)`: save a model in memory into `folder` so that its format's loader reads it back.
Writer = Callable[[Any, Path, Any], None]
# `loading_code(auto_class, target, peft_auto_class, processor_class)`: the card's snippet; `target` is a JSON string.
LoadingCode = Callable[[str, str, str, str], str]


@dataclass(frozen=True)
class ExportFormat:
    name: str
    loads_with: str  # one of LOADERS: what must be imported before `from_pretrained`
    detect: Callable[[Path], bool]  # a saved folder is in this format
    description: str = ""
    requires: tuple[str, ...] = ()  # packages `from_pretrained` needs installed for it (pip names)
    # A model in memory is in this format, so `write` is how it is saved (None: no model in memory is: the format
    # is only ever written by an explicit choice, such as `save_compressed(sparse=True)`, or by another library).
    holds: Callable[[Any], bool] | None = None
    write: Writer | None = None
    loading_code: LoadingCode | None = None  # None: the snippet `loads_with` implies (`detect.loading_code`)


def saved_quant_method(folder: Path) -> str | None:
    """The `quantization_config.quant_method` of the `config.json` in `folder`, or None."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return quantization.get("quant_method") if isinstance(quantization, dict) else None


def quant_method_in_memory(model) -> str | None:
    """The quant_method of a model in memory: its transformers quantizer's, else its config's
    `quantization_config` (a dict for hf-modelopt's structured layer shapes), else None."""
    quantizer_config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    method = getattr(quantizer_config, "quant_method", None)
    if method is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return getattr(method, "value", method)  # (transformers' QuantizationMethod is a str enum)


def save_pretrained_with_tokenizer(model, folder: Path, tokenizer=None) -> None:
    """`save_pretrained` of the model and its tokenizer: the writer of every format transformers saves itself."""
    model.save_pretrained(Path(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(Path(folder))


def transformers_loading_code(auto_class: str, target: str, processor_class: str, import_first: str = "") -> str:
    """`AutoModelFor...from_pretrained(target)` and the processor, after `import_first` (a line) if given."""
    processor = "tokenizer" if processor_class == "AutoTokenizer" else "processor"
    lines = [f"from transformers import {processor_class}, {auto_class}", "",
             f"model = {auto_class}.from_pretrained({target})",
             f"{processor} = {processor_class}.from_pretrained({target})"]
    return "\n".join(([import_first] if import_first else []) + lines)
