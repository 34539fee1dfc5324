"""What an export folder holds, what loads it, and loading it that way.

Every export loads with a `from_pretrained` call; what differs is what must be imported first:

- `transformers`: plain safetensors (fine-tuned, distilled, GGUF dequantized) and bitsandbytes-quantized
  checkpoints (transformers reads their `quantization_config`; bitsandbytes must be installed);
- `hf_modelopt`: formats whose loading hooks hf-modelopt registers with transformers at `import hf_modelopt`
  (techniques add their format to `EXPORT_FORMATS`);
- `peft`: adapter folders (`adapter_config.json`), loaded with peft's `AutoPeftModelFor...` classes, which
  fetch the base model named in the adapter config.

`EXPORT_FORMATS` is checked in order and the first format whose `detect(folder)` is true wins; the last,
`dense`, matches every folder with a `config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOADERS = ("transformers", "hf_modelopt", "peft")


@dataclass(frozen=True)
class ExportFormat:
    name: str
    loads_with: str  # one of LOADERS: what must be imported before `from_pretrained`
    detect: Callable[[Path], bool]
    description: str = ""
    requires: tuple[str, ...] = ()  # packages `from_pretrained` needs installed for it (pip names)


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _is_compressed_tensors(folder: Path) -> bool:
    return _config(folder).get("quantization_config", {}).get("quant_method") == "compressed-tensors"


def _is_bitsandbytes(folder: Path) -> bool:
    return _config(folder).get("quantization_config", {}).get("quant_method") == "bitsandbytes"


def _is_hf_modelopt(folder: Path) -> bool:
    return _config(folder).get("quantization_config", {}).get("quant_method") == "hf_modelopt"


def _is_base_with_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and (folder / "config.json").is_file()


EXPORT_FORMATS: list[ExportFormat] = [
    # Base weights and adapters in one folder (the quantize stage's KD recovery): transformers loads the base
    # from the folder itself and attaches the adapters; peft's AutoPeftModel would fetch the adapter config's
    # original base instead.
    ExportFormat("base-with-adapter", "transformers", _is_base_with_adapter,
                 "a (bitsandbytes-quantized) base model with peft LoRA adapters in the same folder; transformers "
                 "loads both (needs peft installed)"),
    ExportFormat("peft-adapter", "peft", lambda folder: (folder / "adapter_config.json").is_file(),
                 "a peft adapter over the base model named in adapter_config.json"),
    ExportFormat("hf-modelopt", "hf_modelopt", _is_hf_modelopt,
                 "hf-modelopt's own storage: sparse weights as values + bitmask, weights stored in 8 / 4 bits, and/or "
                 "structurally pruned layer shapes that no config field can describe, read by the hf_modelopt "
                 "loading hook (formats/hf_modelopt.py)"),
    ExportFormat("compressed-tensors", "transformers", _is_compressed_tensors,
                 "int8 / int4 weights in the compressed-tensors format (needs the compressed-tensors package)",
                 requires=("compressed-tensors",)),
    ExportFormat("bitsandbytes", "transformers", _is_bitsandbytes,
                 "bitsandbytes 8-bit / 4-bit weights (needs bitsandbytes installed)", requires=("bitsandbytes",)),
    ExportFormat("dense", "transformers", lambda folder: (folder / "config.json").is_file(),
                 "plain safetensors weights"),
]


def register_export_format(export_format: ExportFormat) -> None:
    """Check `export_format` before the built-in ones (a technique's own format is more specific)."""
    if export_format.loads_with not in LOADERS:
        raise ValueError(f"loads_with must be one of {LOADERS}, got {export_format.loads_with!r}")
    EXPORT_FORMATS[:] = [f for f in EXPORT_FORMATS if f.name != export_format.name]
    EXPORT_FORMATS.insert(0, export_format)


def detect_format(folder) -> ExportFormat:
    """The format of the export in `folder`; `ValueError` naming the folder when nothing matches."""
    folder = Path(folder)
    for export_format in EXPORT_FORMATS:
        if export_format.detect(folder):
            return export_format
    raise ValueError(f"{folder}: no config.json or adapter_config.json: not a saved model")


def load_exported(folder, auto_class: str, peft_auto_class: str = "AutoPeftModel", trust_remote_code: bool = False):
    """Load an export folder as a user would (after `import hf_modelopt`, which registers hooks), with the
    transformers Auto class of its task (`Task.auto_class`), or peft's (`Task.peft_auto_class`) for an adapter."""
    from .hf_modelopt import register_loading_hooks

    register_loading_hooks()  # what `import hf_modelopt` does for a user

    kwargs = {"trust_remote_code": trust_remote_code}
    if detect_format(folder).loads_with == "peft":
        import peft

        return getattr(peft, peft_auto_class).from_pretrained(str(folder), **kwargs)
    import transformers

    return getattr(transformers, auto_class).from_pretrained(str(folder), **kwargs)


def loading_code(export_format: ExportFormat, auto_class: str, path_or_repo_id: str,
                 peft_auto_class: str = "AutoPeftModel", processor_class: str = "AutoTokenizer") -> str:
    """Python that loads the export with its task's classes: the snippet the model card shows (tests run it)."""
    target = json.dumps(path_or_repo_id)
    processor = "tokenizer" if processor_class == "AutoTokenizer" else "processor"
    if export_format.loads_with == "peft":
        cls = peft_auto_class
        lines = [f"from peft import {cls}", f"from transformers import {processor_class}", "",
                 f"model = {cls}.from_pretrained({target})  # also fetches the base model"]
    else:
        cls = auto_class
        lines = [f"from transformers import {processor_class}, {cls}", ""]
        if export_format.loads_with == "hf_modelopt":
            lines[:0] = ["import hf_modelopt  # noqa: F401  registers the loading hooks of this format"]
        lines.append(f"model = {cls}.from_pretrained({target})")
    lines.append(f"{processor} = {processor_class}.from_pretrained({target})")
    return "\n".join(lines)


# Weight files in the order transformers prefers them when a folder holds several kinds.
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def weights_size_on_disk(folder, gguf_file: str | None = None) -> int | None:
    """Bytes of the weights a model loads from `folder`: its GGUF file `gguf_file` when given, else its safetensors
    files, else its .bin, else its .pt files (config and tokenizer files are not counted); None when it has none.

    The one rule every "weights on disk" figure uses (export, bench, inspect, the stages' reports).
    """
    folder = Path(folder)
    if gguf_file:
        return (folder / gguf_file).stat().st_size if (folder / gguf_file).is_file() else None
    for pattern in WEIGHT_FILE_PATTERNS:
        files = [f for f in folder.glob(pattern) if f.is_file()]
        if files:
            return sum(f.stat().st_size for f in files)  # stat() follows the HF cache's symlinks to the blobs
    return None
