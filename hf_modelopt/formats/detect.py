"""The format registry: which format a saved folder is in (`detect_format`), which format a model in memory is in
and so how it is written (`format_of_model`, `write_model`), what must be imported to load a folder, and loading it
that way.

Every export loads with a `from_pretrained` call; what differs is what must be imported first:

- `transformers`: plain safetensors (fine-tuned, distilled, GGUF dequantized), bitsandbytes and compressed-tensors
  checkpoints (transformers reads their `quantization_config`; the package must be installed);
- `hf_modelopt`: formats whose loading hooks hf-modelopt registers with transformers at `import hf_modelopt`;
- `peft`: adapter folders (`adapter_config.json`), loaded with peft's `AutoPeftModelFor...` classes, which
  fetch the base model named in the adapter config.

Each format lives in its own module, which declares an `ExportFormat` (detection, writer, loading snippet):
`adapters.py`, `hf_modelopt.py`, `compressed_tensors.py`, `bitsandbytes.py`, `dense.py`. `EXPORT_FORMATS` is
tried in order and the first match wins; the last, `dense`, matches every folder with a `config.json` and every
model in memory. A new format is one module and one `register_export_format` call (tried before the built-in ones).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import adapters, bitsandbytes, compressed_tensors, dense
from . import hf_modelopt as hf_modelopt_format
from .export_format import LOADERS, ExportFormat, transformers_loading_code

__all__ = ["EXPORT_FORMATS", "LOADERS", "ExportFormat", "detect_format", "format_of_model", "load_exported",
           "loading_code", "register_export_format", "weights_size_on_disk", "write_model"]

EXPORT_FORMATS: list[ExportFormat] = [
    adapters.BASE_WITH_ADAPTER,  # (before peft-adapter: both have adapter_config.json, this one a config.json too)
    adapters.PEFT_ADAPTER,
    hf_modelopt_format.EXPORT_FORMAT,
    compressed_tensors.EXPORT_FORMAT,
    bitsandbytes.EXPORT_FORMAT,
    dense.EXPORT_FORMAT,
]


def register_export_format(export_format: ExportFormat) -> None:
    """Try `export_format` (its detection and, if it `holds` models in memory, its writer) before the built-in ones
    (a technique's own format is more specific); a format of the same name is replaced."""
    if export_format.loads_with not in LOADERS:
        raise ValueError(f"loads_with must be one of {LOADERS}, got {export_format.loads_with!r}")
    if (export_format.holds is None) != (export_format.write is None):
        raise ValueError(f"export format {export_format.name!r}: `holds` and `write` come together (a format that "
                         "recognises models in memory must say how to write them)")
    EXPORT_FORMATS[:] = [f for f in EXPORT_FORMATS if f.name != export_format.name]
    EXPORT_FORMATS.insert(0, export_format)


def detect_format(folder) -> ExportFormat:
    """The format of the export in `folder`; `ValueError` naming the folder when nothing matches."""
    folder = Path(folder)
    for export_format in EXPORT_FORMATS:
        if export_format.detect(folder):
            return export_format
    raise ValueError(f"{folder}: no config.json or adapter_config.json: not a saved model")


def format_of_model(model) -> ExportFormat:
    """The format `model` (in memory) is in: the first registered format that holds it (at worst `dense`)."""
    return next(f for f in EXPORT_FORMATS if f.holds is not None and f.holds(model))


def write_model(model, folder, tokenizer=None) -> ExportFormat:
    """Save `model` (and `tokenizer`) into `folder` with the writer of the format it is in; returns that format.

    No load check (`hf_modelopt.save_compressed` adds one, and the choice of sparse or quantized storage)."""
    export_format = format_of_model(model)
    export_format.write(model, Path(folder), tokenizer)
    return export_format


def load_exported(folder, auto_class: str, peft_auto_class: str = "AutoPeftModel", trust_remote_code: bool = False):
    """Load an export folder as a user would (after `import hf_modelopt`, which registers hooks), with the
    transformers Auto class of its task (`Task.auto_class`), or peft's (`Task.peft_auto_class`) for an adapter."""
    hf_modelopt_format.register_loading_hooks()  # what `import hf_modelopt` does for a user

    kwargs = {"trust_remote_code": trust_remote_code}
    if detect_format(folder).loads_with == "peft":
        import peft

        return getattr(peft, peft_auto_class).from_pretrained(str(folder), **kwargs)
    import transformers

    return getattr(transformers, auto_class).from_pretrained(str(folder), **kwargs)


def loading_code(export_format: ExportFormat, auto_class: str, path_or_repo_id: str,
                 peft_auto_class: str = "AutoPeftModel", processor_class: str = "AutoTokenizer") -> str:
    """Python that loads the export with its task's classes: the snippet the model card shows (tests run it); the
    format's own snippet where it declares one, else the one its `loads_with` implies."""
    target = json.dumps(path_or_repo_id)
    if export_format.loading_code is not None:
        return export_format.loading_code(auto_class, target, peft_auto_class, processor_class)
    if export_format.loads_with == "peft":
        return adapters.PEFT_ADAPTER.loading_code(auto_class, target, peft_auto_class, processor_class)
    if export_format.loads_with == "hf_modelopt":
        return hf_modelopt_format.EXPORT_FORMAT.loading_code(auto_class, target, peft_auto_class, processor_class)
    return transformers_loading_code(auto_class, target, processor_class)


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
