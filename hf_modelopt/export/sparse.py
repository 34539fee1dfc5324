"""Sparse checkpoints that shrink on disk: pruned Linear weights stored as values + bitmask.

`save_sparse(model, folder)` writes a folder that `from_pretrained` loads after `import hf_modelopt`
(the `hf_modelopt` loading hook decompresses it, see `export/loading.py`); the loaded model is the same
dense model, bit for bit. A weight is stored compressed when that is smaller: for fp32 values, at
sparsity above 1/32 (the bitmask costs 1 bit per position, each kept value 32 bits).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .loading import QUANT_METHOD, compress_weight


def sparse_state_dict(model, min_sparsity: float | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's state dict with every sufficiently sparse 2-D Linear weight compressed; and their names."""
    from ..prune.masks import is_linear

    state = {k: v for k, v in model.state_dict().items()}
    compressed = []
    for name, module in model.named_modules():
        if not is_linear(module) or f"{name}.weight" not in state:
            continue
        weight = module.weight.detach()
        bits = torch.finfo(weight.dtype).bits if weight.dtype.is_floating_point else 8
        sparsity = float((weight == 0).sum()) / weight.numel()
        # compressed size (1 - s)·bits + 1 per position, against bits dense
        threshold = min_sparsity if min_sparsity is not None else 1.0 / bits
        if sparsity <= threshold:
            continue
        values, packed = compress_weight(weight.cpu())
        state[f"{name}.weight"] = values
        state[f"{name}.weight_bitmask"] = packed
        compressed.append(name)
    return state, compressed


def save_sparse(model, folder, tokenizer=None) -> list[str]:
    """Save `model` to `folder` in the compressed sparse format; returns the compressed module names."""
    state, compressed = sparse_state_dict(model)
    save_in_hf_modelopt_format(model, folder, state, {"sparse_format": "bitmask"}, tokenizer)
    return compressed


def save_in_hf_modelopt_format(model, folder, state: dict, entries: dict, tokenizer=None) -> None:
    """`model.save_pretrained(folder, state_dict=state)` with a `quant_method: hf_modelopt` quantization_config
    made of `entries` (plus the layer shapes of a structurally pruned model); the model itself is left as is."""
    original = getattr(model.config, "quantization_config", None)
    model.config.quantization_config = {"quant_method": QUANT_METHOD, **entries, **structured_entries(original)}
    try:
        model.save_pretrained(Path(folder), state_dict=state)
    finally:
        if original is None:
            del model.config.quantization_config
        else:
            model.config.quantization_config = original
    if tokenizer is not None:
        tokenizer.save_pretrained(Path(folder))


def structured_entries(original) -> dict:
    """Keep the layer shapes of a structurally pruned model when it is also saved sparse."""
    if original is None:
        return {}
    entries = original if isinstance(original, dict) else copy.deepcopy(original.__dict__)
    return {k: entries[k] for k in ("layer_shapes", "attention_heads") if entries.get(k)}


def weights_size_on_disk(folder) -> int:
    """Bytes of the weight files (`*.safetensors`) in `folder`."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
