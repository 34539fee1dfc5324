"""On-disk formats: how a compressed model is written, and how `from_pretrained` reads it back.

A leaf package: it imports nothing of hf-modelopt's techniques, so every technique, the export and any
third-party code can use it, and loading a model never imports training code.

- `bitmask.py`: sparse weights as kept values + a bitmask of their positions.
- `groupwise.py`: weights stored as group-wise int8 / NF4 codes with fp16 scales.
- `hf_modelopt.py`: the `quant_method: hf_modelopt` quantization_config that records these (and structurally
  pruned layer shapes) in `config.json`, the loading hooks registered with transformers at `import hf_modelopt`,
  and the writers (`save_sparse`, `save_with_quantized_storage`).
- `export_format.py`: `ExportFormat`, what a format declares: detection, writer, loading snippet.
- `adapters.py`, `compressed_tensors.py`, `bitsandbytes.py`, `dense.py` (and `hf_modelopt.py`): one module per
  format, each declaring its `ExportFormat`.
- `detect.py`: the registry: which format a saved folder or a model in memory is in, writing a model with its
  format's writer (`write_model`), what must be imported to load a folder, and loading it that way.
- `modules.py`: module surgery the formats and the techniques share.
- `bnb_layers.py`: which layers transformers' bitsandbytes integration replaces (read by quantization and the
  support check).
"""

_EXPORTS = {
    "ExportFormat": "detect",
    "detect_format": "detect",
    "format_of_model": "detect",
    "keep_pristine_state": "bitsandbytes",
    "load_exported": "detect",
    "loading_code": "detect",
    "register_export_format": "detect",
    "weights_size_on_disk": "detect",
    "write_model": "detect",
    "register_loading_hooks": "hf_modelopt",
    "save_sparse": "hf_modelopt",
    "save_with_quantized_storage": "hf_modelopt",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    # Lazy, like the top-level package: `import hf_modelopt` loads this package without torch.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_modelopt.formats' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
