"""Sparse weights stored as their kept values plus a bitmask of their positions.

A weight is stored compressed when that is smaller: for fp32 values, at sparsity above 1/32 (the bitmask
costs 1 bit per position, each kept value 32 bits). `hf_modelopt.formats.hf_modelopt.save_sparse` writes a
folder of them that `from_pretrained` loads after `import hf_modelopt` (its loading hook decompresses it);
the loaded model is the same dense model, bit for bit.
"""

from __future__ import annotations

import torch

from .modules import is_linear, zero_fraction


def pack_bitmask(mask):
    """A bool tensor as packed bits (uint8, 8 positions per byte, row-major, little-endian bit order)."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_bitmask(packed, shape):
    numel = 1
    for size in shape:
        numel *= size
    bits = (packed.view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten()[:numel].bool().view(*shape)


def compress_weight(weight):
    """(values, packed bitmask) of a sparse weight: the nonzero values in row-major order and their positions."""
    mask = weight != 0
    return weight[mask].contiguous(), pack_bitmask(mask)


def decompress_weight(values, packed, shape):
    mask = unpack_bitmask(packed, shape)
    dense = torch.zeros(tuple(shape), dtype=values.dtype)
    dense[mask] = values
    return dense


def sparse_state_dict(model, min_sparsity: float | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's state dict with every sufficiently sparse 2-D Linear weight compressed; and their names."""
    state = {k: v for k, v in model.state_dict().items()}
    compressed = []
    for name, module in model.named_modules():
        if not is_linear(module) or f"{name}.weight" not in state:
            continue
        weight = module.weight.detach()
        bits = torch.finfo(weight.dtype).bits if weight.dtype.is_floating_point else 8
        sparsity = zero_fraction(weight)
        # compressed size (1 - s)·bits + 1 per position, against bits dense
        threshold = min_sparsity if min_sparsity is not None else 1.0 / bits
        if sparsity <= threshold:
            continue
        values, packed = compress_weight(weight.cpu())
        state[f"{name}.weight"] = values
        state[f"{name}.weight_bitmask"] = packed
        compressed.append(name)
    return state, compressed
