"""`save_compressed(model, folder)`: write a model in the format that expresses what was done to it.

- bitsandbytes-quantized (`quantize`): bitsandbytes' own checkpoint, from the state before any CPU forward
  pass; loads with plain transformers (bitsandbytes installed).
- peft LoRA adapters on it (`quantize` with recovery): that base plus `adapter_model.safetensors` in one
  folder; plain transformers (peft installed).
- `storage=StorageQuantizationConfig(...)`: group-wise int8 / int4 Linear weights in compressed-tensors; plain
  transformers (compressed-tensors installed). With `format="hf_modelopt"` (or where compressed-tensors cannot
  hold the model): int8 / NF4 codes for Linear and embedding weights, + bitmask where sparse; after
  `import hf_modelopt`.
- `sparse=True`: pruned Linear weights as kept values + bitmask; after `import hf_modelopt`.
- structurally pruned with shapes no config field expresses (BERT with fewer heads in a layer): safetensors +
  `layer_shapes`; after `import hf_modelopt`.
- anything else (a pruned model: dense weights with zeros): plain safetensors; plain transformers.

The returned `ExportFormat` says which: `loads_with` is what to import before `from_pretrained`. Before it is
returned, the folder is loaded that way (`verify=`: in this process by default, or in a fresh one that imports only
what `loads_with` names), with no weight missing or of another shape; quantized storage whose
compressed-tensors folder does not load is written again in hf-modelopt's format, and any other failure raises
`ExportLoadError` (one line) instead of returning a format that claims a loader it fails with.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from ..compat import COMPRESSED_TENSORS_UNLOADABLE, require_support
from ..errors import UserError, clip
from ..files import remove_inside

logger = logging.getLogger("hf_modelopt")

# How `save_compressed` checks that the folder loads with the loader it names: "in-process" (default: a
# `from_pretrained` here, after hf_modelopt's hooks are registered; a second copy of the model in memory, a fraction
# of a second for small models), "fresh-process" (a new Python that imports only what `loads_with` names: proves
# what a user gets, costs a process start and the transformers import, seconds), or False (no check).
VERIFY_MODES = ("in-process", "fresh-process", False)
FRESH_PROCESS_TIMEOUT_S = 900

# Run by `python -c` in the fresh process: nothing of hf_modelopt unless the format needs its hooks.
_FRESH_LOAD = """
import json, sys
folder, architecture, loads_with = sys.argv[1:4]
if loads_with == "hf_modelopt":
    import hf_modelopt  # noqa: F401  (registers the loading hooks)
import transformers
model, info = getattr(transformers, architecture).from_pretrained(folder, output_loading_info=True)
print(json.dumps({key: sorted(map(str, info.get(key) or ())) for key in ("missing_keys", "mismatched_keys")}))
"""


class ExportLoadError(UserError):
    """A folder `save_compressed` wrote does not load with the loader its format names."""


# Formats a model in memory is written in whatever `sparse=` / `storage=` ask: format name -> why they do not apply.
KEEPS_ITS_FORMAT = {
    "base-with-adapter": "a model with peft adapters is saved as base + adapters: sparse= and storage= do not apply "
                         "(merge the adapters first to store it otherwise)",
    "bitsandbytes": "a bitsandbytes model is saved in bitsandbytes' format: sparse= and storage= do not apply",
}


def _quant_method(model) -> str | None:
    quantizer = getattr(model, "hf_quantizer", None)
    return getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)


def storage_format(model, storage) -> tuple[str, str | None]:
    """The format `storage` (a `StorageQuantizationConfig`) is written in for `model`, and why, when it is not the one
    asked for: compressed-tensors unless it cannot hold the model (then hf_modelopt, with a warning saying why)."""
    from ..formats import compressed_tensors

    if storage.format == "hf_modelopt":
        return "hf_modelopt", None
    reason = compressed_tensors.blocker(model) or COMPRESSED_TENSORS_UNLOADABLE.get(model.config.model_type)
    if reason is None:
        quantized, kept = compressed_tensors.plan(model, storage.linear_bits, storage.embedding_bits,
                                                  storage.group_size, tuple(storage.skip_modules))
        if not quantized:
            reason = "no weight it can hold (" + "; ".join(sorted(set(kept.values()))[:2]) + ")"
    if reason is None:
        return "compressed-tensors", None
    logger.warning("quantized storage: compressed-tensors cannot hold this model (%s); writing hf-modelopt's "
                   "format, which loads after `import hf_modelopt`", reason)
    return "hf_modelopt", reason


def save_stored(model, folder, tokenizer, storage, sparse: bool = False):
    """Write `model` with quantized weight storage as `storage` says; returns its `StorageReport`."""
    from ..formats.compressed_tensors import save_compressed_tensors
    from ..formats.hf_modelopt import save_with_quantized_storage

    chosen, _ = storage_format(model, storage)
    if sparse and chosen == "compressed-tensors":
        raise ValueError("compressed-tensors has no sparse format (its zeros are stored dense): for kept values + "
                         "bitmask, use StorageQuantizationConfig(format='hf_modelopt')")
    options = (storage.linear_bits, storage.embedding_bits, storage.group_size, tuple(storage.skip_modules))
    if chosen == "compressed-tensors":
        return save_compressed_tensors(model, folder, tokenizer, *options)
    return save_with_quantized_storage(model, folder, tokenizer, *options)


def _architecture(folder: Path) -> str:
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    if not architectures:
        raise ExportLoadError(f"{folder}/config.json names no architecture: from_pretrained cannot choose a class")
    return architectures[0]


def _loading_info(folder: Path, export_format, mode: str) -> dict[str, list[str]]:
    """The weights `from_pretrained` did not find in `folder` (`missing_keys`: it initialised them at random) or
    found with another shape (`mismatched_keys`), loading it as `export_format.loads_with` says, in `mode`."""
    architecture = _architecture(folder)
    if mode == "fresh-process":
        done = subprocess.run([sys.executable, "-c", _FRESH_LOAD, str(folder), architecture, export_format.loads_with],
                              capture_output=True, text=True, timeout=FRESH_PROCESS_TIMEOUT_S)
        if done.returncode:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise RuntimeError(lines[-1] if lines else f"exit code {done.returncode}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    import transformers

    from ..formats.hf_modelopt import register_loading_hooks

    if export_format.loads_with == "hf_modelopt":
        register_loading_hooks()  # what `import hf_modelopt` does for a user (already done by importing it)
    _, info = getattr(transformers, architecture).from_pretrained(str(folder), output_loading_info=True)
    return {key: sorted(map(str, info.get(key) or ())) for key in ("missing_keys", "mismatched_keys")}


def load_failure(folder: Path, export_format, mode) -> str | None:
    """Why `folder` does not load as `export_format` says (an exception, or weights from_pretrained did not find and
    so initialised at random), or None when it loads."""
    if not mode or export_format.loads_with == "peft":
        # (adapter folders load their base from the adapter config's path: checked by the recipe's export check)
        return None
    try:
        info = _loading_info(folder, export_format, mode)
    except Exception as error:  # any failure of the loader is the finding
        text = str(error).strip()
        return f"{type(error).__name__}: {clip(text.splitlines()[0] if text else '', 300)}"
    for key, what in (("missing_keys", "not found, so initialised at random"), ("mismatched_keys", "of another shape")):
        if info.get(key):
            return f"{len(info[key])} weights {what} (first: {info[key][0]})"
    return None


def _written_since(folder: Path, before: set[Path]) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and path not in before]


def save_compressed(model, folder, tokenizer=None, *, sparse: bool = False, storage=None, verify="in-process"):
    """Save `model` (and `tokenizer`) into `folder` in the format that expresses it; returns its `ExportFormat`.

    Args:
        sparse: store pruned Linear weights compressed (kept values + bitmask), the smallest form of a
            sparse model; it loads after `import hf_modelopt`. Off: zeros stay in dense weights, which plain
            transformers loads.
        storage: a `StorageQuantizationConfig`: store the weights as group-wise 8- or 4-bit codes, in
            compressed-tensors (plain transformers loads it, with the compressed-tensors package) unless it asks
            for hf-modelopt's format or compressed-tensors cannot hold the model; either loads back in full
            precision.
        verify: check that the folder loads with the loader its format names, no weight missing or mismatched:
            "in-process" (default), "fresh-process" (a new Python that imports only that loader: what a user gets)
            or False. A compressed-tensors folder that fails is written again in hf-modelopt's format; any other
            failure raises `ExportLoadError`.

    Example:
        fmt = save_compressed(model, "out/", tokenizer, sparse=True)
        print(fmt.loads_with)  # "hf_modelopt": `import hf_modelopt` before `from_pretrained("out/")`
    """
    from ..extras import require_extra
    from ..formats.detect import detect_format, format_of_model, write_model
    from ..formats.hf_modelopt import save_sparse

    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if storage is not None and storage.format == "compressed-tensors":
        require_extra("storage in the compressed-tensors format", "compressed_tensors")
    require_support("export", model)
    folder = Path(folder)
    before = {path for path in folder.rglob("*") if path.is_file()} if folder.is_dir() else set()
    if _quant_method(model) == "gguf":
        from ..modeling import drop_gguf_quantizer

        model = drop_gguf_quantizer(model)  # GGUF weights load dequantized; its quantizer refuses save_pretrained
    held = format_of_model(model).name
    if held in KEEPS_ITS_FORMAT and (sparse or storage is not None):
        raise ValueError(KEEPS_ITS_FORMAT[held])
    if storage is not None:
        save_stored(model, folder, tokenizer, storage, sparse=sparse)
    elif sparse:
        save_sparse(model, folder, tokenizer)
    else:
        write_model(model, folder, tokenizer)  # the writer of the format the model is in (formats.detect)
    export_format = detect_format(folder)
    failure = load_failure(folder, export_format, verify)
    if failure is not None and export_format.name == "compressed-tensors":
        logger.warning("quantized storage: the compressed-tensors folder %s does not load with plain transformers "
                       "(%s); writing hf-modelopt's format instead, which loads after `import hf_modelopt`",
                       folder, failure)
        for path in _written_since(folder, before):  # only what this call wrote
            remove_inside(path, folder)
        save_stored(model, folder, tokenizer, storage.model_copy(update={"format": "hf_modelopt"}), sparse=sparse)
        export_format = detect_format(folder)
        failure = load_failure(folder, export_format, verify)
    if failure is not None:
        raise ExportLoadError(f"save_compressed: {folder} is in the {export_format.name} format, which loads with "
                              f"{export_format.loads_with}, but loading it ({verify}) failed: {failure}")
    logger.info("saved %s in the %s format: from_pretrained loads it after importing %s", folder,
                export_format.name, export_format.loads_with)
    return export_format
