"""Storage quantization: weights kept in 8 or 4 bits on disk, full precision again once loaded.

The weights of the Linear layers and the embedding matrices are cut into groups of `group_size`
consecutive values (row-major; for a pruned weight, its kept values). Each group stores one fp16 scale, its
absolute maximum, and one code per value: an int8 `round(127 · v / scale)`, or the index of the nearest
NF4 level (the 16 normal-quantile levels of QLoRA, two codes per byte). Weights sparse enough keep the
bitmask of `bitmask.py` and quantize only their kept values.

The `hf_modelopt` loading hook (`hf_modelopt.py`) dequantizes while `from_pretrained` loads, so the
loaded model is a plain full-precision model: the download and the disk shrink, while speed and memory
stay those of the full-precision model. That is the point on CPU, where bitsandbytes' int8 and 4-bit
kernels run slower than fp32 matmuls (measured in BENCHMARKS.md); on a GPU, the bitsandbytes `quantize`
stage also saves memory at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .bitmask import compress_weight, decompress_weight, unpack_bitmask
from .modules import is_linear, zero_fraction

# QLoRA's NF4 levels (Dettmers et al. 2023), the same values as `bitsandbytes.functional.get_4bit_type("nf4")`.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
WEIGHT_FORMAT = "groupwise"  # the `weight_format` of the `hf_modelopt` quantization_config


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = values.detach().flatten().float()
    return torch.nn.functional.pad(flat, (0, (-flat.numel()) % group_size)).view(-1, group_size)


def quantize_groups(values: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp16 scales) of `values` flattened: int8 codes for 8 bits, packed NF4 indices (uint8) for 4."""
    groups = _groups(values, group_size)
    scales = groups.abs().amax(dim=1).to(torch.float16)
    safe = scales.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(1)  # all-zero groups stay zero
    normalized = (groups / safe).clamp(-1, 1)
    if bits == 8:
        codes = torch.round(normalized * 127).to(torch.int8).flatten()[: values.numel()]
        return codes, scales
    if bits != 4:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    levels = torch.tensor(NF4_LEVELS)
    indices = (normalized.flatten()[: values.numel()].unsqueeze(1) - levels).abs().argmin(dim=1).to(torch.uint8)
    indices = torch.nn.functional.pad(indices, (0, indices.numel() % 2))
    return indices[0::2] | (indices[1::2] << 4), scales


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    """The 1-D float32 values of `quantize_groups`' output; the code dtype says the bits (int8: 8, uint8: 4)."""
    if codes.dtype == torch.int8:
        normalized = codes.float() / 127
    else:
        indices = torch.stack([codes & 0xF, codes >> 4], dim=1).flatten()[:numel].long()
        normalized = torch.tensor(NF4_LEVELS)[indices]
    normalized = torch.nn.functional.pad(normalized, (0, (-numel) % group_size)).view(-1, group_size)
    return (normalized * scales.float().unsqueeze(1)).flatten()[:numel]


@dataclass
class StorageReport:
    """What `storage_state_dict` did to each weight: {module: "int8" | "nf4" | "int8+bitmask" | ...}."""

    formats: dict[str, str] = field(default_factory=dict)
    # stored in full precision: quantizable modules of the skip list, and fused MoE expert parameters
    kept: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"formats": self.formats, "kept_in_full_precision": self.kept}


def _quantizable(model, linear_bits: int | None, embedding_bits: int | None):
    """(module name, module, bits) of every Linear (GPT-2's Conv1D too) and Embedding to store quantized."""
    for name, module in model.named_modules():
        if is_linear(module) and linear_bits:
            yield name, module, linear_bits
        elif isinstance(module, torch.nn.Embedding) and embedding_bits:
            yield name, module, embedding_bits


def storage_state_dict(model, linear_bits: int | None = 8, embedding_bits: int | None = 8, group_size: int = 64,
                       skip: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], StorageReport]:
    """The model's state dict with its Linear and Embedding weights stored quantized (and bitmask-compressed
    when sparse enough); modules whose name ends with an entry of `skip` stay in full precision."""
    state = dict(model.state_dict())
    report = StorageReport()
    seen = set()
    for name, module, bits in _quantizable(model, linear_bits, embedding_bits):
        key = f"{name}.weight"
        if key not in state or id(module.weight) in seen:  # tied weights are stored once, like save_pretrained
            continue
        seen.add(id(module.weight))
        if any(name == s or name.endswith(f".{s}") for s in skip):
            report.kept.append(name)
            continue
        weight = module.weight.detach().cpu()
        sparsity = zero_fraction(weight)
        label = "int8" if bits == 8 else "nf4"
        # values + bitmask costs (1 - s)·bits + 1 bits per position, against bits dense
        if sparsity > 1 / bits:
            weight, state[f"{name}.weight_bitmask"] = compress_weight(weight)
            label += "+bitmask"
        state[key], state[f"{name}.weight_scale"] = quantize_groups(weight, bits, group_size)
        report.formats[name] = label
    if linear_bits:
        # Fused 3-D expert weights are no Linear layers: they are stored in full precision, and the report says so.
        from .experts import EXPERT_WEIGHTS, experts_modules

        report.kept += [f"{name}.{param}" for name, experts in experts_modules(model).items()
                        for param in EXPERT_WEIGHTS if getattr(experts, param, None) is not None]
    return state, report


def dequantize_in_place_(model, linear_bits: int | None = 8, embedding_bits: int | None = 8, group_size: int = 64,
                         skip: tuple[str, ...] = ()) -> None:
    """Round `model`'s weights the way the storage format does: the model a user loads from it, in memory."""
    state, _ = storage_state_dict(model, linear_bits, embedding_bits, group_size, skip)
    load_stored_weights_(model, state, group_size)


def load_stored_weights_(model, state: dict[str, torch.Tensor], group_size: int) -> None:
    """Copy the decoded weights of a `storage_state_dict` into `model` (built from that same model)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            scale = state.get(f"{name}.weight_scale")
            if scale is None:
                continue
            weight = module.weight
            packed = state.get(f"{name}.weight_bitmask")
            weight.copy_(decode_weight(state[f"{name}.weight"], scale, packed, weight.shape, group_size)
                         .to(weight.dtype))


def decode_weight(stored, scale, packed, shape, group_size: int | None):
    """A weight as stored in the `hf_modelopt` formats, back to a dense tensor of `shape`.

    `stored` holds every value (dense) or the kept values (with the `packed` bitmask), in full precision or
    as group-wise codes with their `scale`s (above).
    """
    numel = 1
    for size in shape:
        numel *= size
    if packed is not None:
        numel = int(unpack_bitmask(packed, shape).sum())
    if scale is not None:
        stored = dequantize_groups(stored, scale, numel, group_size)
    if packed is not None:
        return decompress_weight(stored, packed, shape)
    return stored.reshape(tuple(shape))
