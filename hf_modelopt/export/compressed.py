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

The returned `ExportFormat` says which: `loads_with` is what to import before `from_pretrained`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..compat import COMPRESSED_TENSORS_UNLOADABLE, require_support
from ..files import remove_inside

logger = logging.getLogger("hf_modelopt")


def _is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


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


def save_compressed(model, folder, tokenizer=None, *, sparse: bool = False, storage=None):
    """Save `model` (and `tokenizer`) into `folder` in the format that expresses it; returns its `ExportFormat`.

    Args:
        sparse: store pruned Linear weights compressed (kept values + bitmask), the smallest form of a
            sparse model; it loads after `import hf_modelopt`. Off: zeros stay in dense weights, which plain
            transformers loads.
        storage: a `StorageQuantizationConfig`: store the weights as group-wise 8- or 4-bit codes, in
            compressed-tensors (plain transformers loads it, with the compressed-tensors package) unless it asks
            for hf-modelopt's format or compressed-tensors cannot hold the model; either loads back in full
            precision.

    Example:
        fmt = save_compressed(model, "out/", tokenizer, sparse=True)
        print(fmt.loads_with)  # "hf_modelopt": `import hf_modelopt` before `from_pretrained("out/")`
    """
    from ..extras import require_extra
    from ..formats.detect import detect_format
    from ..formats.hf_modelopt import save_sparse
    from ..quant.bnb import PRISTINE_STATE, save_quantized

    if storage is not None and storage.format == "compressed-tensors":
        require_extra("storage in the compressed-tensors format", "compressed_tensors")
    require_support("export", model)
    folder = Path(folder)
    if _quant_method(model) == "gguf":
        from ..modeling import drop_gguf_quantizer

        model = drop_gguf_quantizer(model)  # GGUF weights load dequantized; its quantizer refuses save_pretrained
    if _is_peft_model(model):
        if sparse or storage is not None:
            raise ValueError("a model with peft adapters is saved as base + adapters: sparse= and storage= do not "
                             "apply (merge the adapters first to store it otherwise)")
        base = model.get_base_model()
        # The base as `quantize` made it, before adapters wrapped its layers and before any forward pass; else (a
        # user's own adapters) its tensors under their unwrapped names.
        state = getattr(base, PRISTINE_STATE, None) or {
            k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if ".lora_" not in k}
        save_quantized(base, folder, tokenizer, state_dict=state)
        model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors beside it
        remove_inside(folder / "README.md", folder)  # peft's placeholder card; the export writes the real one
    elif _quant_method(model) == "bitsandbytes":
        if sparse or storage is not None:
            raise ValueError("a bitsandbytes model is saved in bitsandbytes' format: sparse= and storage= do not apply")
        save_quantized(model, folder, tokenizer)
    elif storage is not None:
        save_stored(model, folder, tokenizer, storage, sparse=sparse)
    elif sparse:
        save_sparse(model, folder, tokenizer)
    else:
        save_quantized(model, folder, tokenizer)  # a plain save_pretrained for a model bitsandbytes never touched
    export_format = detect_format(folder)
    logger.info("saved %s in the %s format: from_pretrained loads it after importing %s", folder,
                export_format.name, export_format.loads_with)
    return export_format
