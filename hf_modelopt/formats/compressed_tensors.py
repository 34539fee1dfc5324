"""Int8 / int4 weights in the compressed-tensors format: the standard one, which plain `from_pretrained` loads with
the `compressed-tensors` package installed (no hf-modelopt, no llm-compressor).

Linear weights are quantized symmetrically in groups of `group_size` consecutive values along
a row (`strategy: group`): `q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)` with one scale per group,
`s = max|w| / ((2^b - 1) / 2)`, compressed-tensors' own `calculate_qparams`. The packed codes are written as
`pack-quantized` (`weight_packed` int32, `weight_scale`, `weight_shape`). transformers rebuilds the model with
compressed-tensors' quantization config and decompresses the weights on the first forward pass, so the
loaded model computes with exactly `dequantize(quantize(w))` in full precision: what
`fake_quantize_in_place_` puts into a model in memory.

What compressed-tensors >= 0.15 (as transformers loads it) cannot express stays out of it: sparse weights are
stored dense (their zeros quantize to zero; the bitmask of `bitmask.py` is hf-modelopt's opt-in smaller form);
embeddings, an output head tied to them, GPT-2's `Conv1D` layers and rows not divisible by `group_size` stay in
full precision (named in the report); a structurally pruned model whose layer shapes no config field
describes, and a mixture-of-experts model (its folder does not reload), cannot use it at all (`blocker`).
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .export_format import (
    ExportFormat,
    quant_method_in_memory,
    save_pretrained_with_tokenizer,
    saved_quant_method,
)

if TYPE_CHECKING:
    from .groupwise import StorageReport

# torch is imported inside the functions that compute: detecting and registering the format (`detect.py`) needs none.

logger = logging.getLogger("hf_modelopt")

QUANT_METHOD = "compressed-tensors"
PACKED_FORMAT = "pack-quantized"
# Seen with transformers 5.24 / compressed-tensors 0.20: loading fails in transformers' weight initialisation,
# which reads `weight` on the compressed embedding (`'Embedding' object has no attribute 'weight'`).
EMBEDDING_REASON = ("embedding: transformers cannot load a compressed-tensors nn.Embedding (its weight "
                    "initialisation reads the `weight` the compressor replaced); the hf_modelopt format stores it")


def blocker(model) -> str | None:
    """Why compressed-tensors cannot hold `model`'s storage, or None when it can."""
    quantization = getattr(model.config, "quantization_config", None)
    entries = quantization if isinstance(quantization, dict) else getattr(quantization, "__dict__", {}) or {}
    if entries.get("layer_shapes"):
        return ("structurally pruned layer shapes that its config cannot describe load only through hf-modelopt's "
                "loading hook")
    if quantization is not None:
        return f"the model is already quantized ({entries.get('quant_method', type(quantization).__name__)})"
    from .experts import experts_modules

    experts = experts_modules(model)
    if experts:
        # Seen with transformers 5.25 / compressed-tensors: the folder is written, then plain from_pretrained fails
        # in the per-expert merge ("Concatenate on tensors destined for model.layers.1.mlp.experts.gate_up_proj").
        return (f"mixture-of-experts weights ({next(iter(experts))}, fused 3-D) do not reload from a "
                "compressed-tensors folder in transformers")
    return None


def _tied_to_output(model) -> set[str]:
    """Names of the input embedding and output head when they share one tensor (stored once, quantized neither)."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or inputs.weight is not outputs.weight:
        return set()
    return {name for name, module in model.named_modules() if module is inputs or module is outputs}


def plan(model, linear_bits: int | None, embedding_bits: int | None, group_size: int,
         skip: tuple[str, ...] = ()) -> tuple[dict[str, int], dict[str, str]]:
    """({module: bits} to quantize, {module: why it stays in full precision})."""
    import torch

    from .modules import is_linear

    tied = _tied_to_output(model)
    quantized, kept = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and embedding_bits:
            kept[name] = EMBEDDING_REASON
            continue
        if not (is_linear(module) and linear_bits):
            continue
        if type(module) is not torch.nn.Linear:
            kind = "a subclass of nn.Linear" if isinstance(module, torch.nn.Linear) else "GPT-2 style Conv1D"
            kept[name] = f"{type(module).__name__} ({kind}): compressed-tensors quantizes exactly nn.Linear"
        elif any(name == s or name.endswith(f".{s}") for s in skip):
            kept[name] = "skip_modules"
        elif name in tied:
            kept[name] = "shares its weight with the input embeddings (tied)"
        elif module.weight.shape[-1] % group_size:
            kept[name] = f"row length {module.weight.shape[-1]} is not a multiple of group_size {group_size}"
        else:
            quantized[name] = linear_bits
    return quantized, kept


def _quantization_config(quantized: dict[str, int], group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    # One config group per bit width; targets are exact module names (`re:` patterns), so nothing else matches.
    groups = {}
    for bits in sorted(set(quantized.values())):
        names = [name for name, b in quantized.items() if b == bits]
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size)
        targets = [f"re:^{re.escape(name)}$" for name in names]
        groups[f"group_int{bits}"] = QuantizationScheme(targets=targets, weights=weights)
    return QuantizationConfig(config_groups=groups, format=PACKED_FORMAT)


def _calibrate_(model) -> None:
    """Set each quantized module's scale (and zero point) from its own weight: weight-only, no data needed."""
    import torch
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.utils import calculate_qparams

    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        weight = module.weight.detach()
        groups = weight.reshape(weight.shape[0], -1, args.group_size)
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        with torch.no_grad():
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
            module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape)
                                           .to(module.weight_zero_point.dtype))
        module.quantization_status = QuantizationStatus.FROZEN


def _quantized_copy(model, linear_bits, embedding_bits, group_size, skip):
    from compressed_tensors.quantization import apply_quantization_config

    from .groupwise import StorageReport

    quantized, kept = plan(model, linear_bits, embedding_bits, group_size, skip)
    if not quantized:
        raise ValueError(f"no weight of {type(model).__name__} can be stored in compressed-tensors: "
                         + "; ".join(f"{n}: {why}" for n, why in list(kept.items())[:3]))
    copied = copy.deepcopy(model).cpu().eval()
    apply_quantization_config(copied, _quantization_config(quantized, group_size))
    _calibrate_(copied)
    report = StorageReport(formats={name: f"int{bits}" for name, bits in quantized.items()}, kept=sorted(kept))
    return copied, report, kept


def fake_quantize_in_place_(model, linear_bits: int | None = 8, embedding_bits: int | None = 8, group_size: int = 64,
                            skip: tuple[str, ...] = ()) -> StorageReport:
    """Give `model` the weights `from_pretrained` returns for its compressed-tensors export: dequantize(quantize(w))."""
    from ..extras import require_extra

    require_extra("the compressed-tensors format", "compressed_tensors")
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    copied, report, _ = _quantized_copy(model, linear_bits, embedding_bits, group_size, skip)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in copied.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            rounded = fake_quantize(module.weight, module.weight_scale, module.weight_zero_point, scheme.weights)
            modules[name].weight.copy_(rounded.to(modules[name].weight.dtype))
    return report


def save_compressed_tensors(model, folder, tokenizer=None, linear_bits: int | None = 8,
                            embedding_bits: int | None = 8, group_size: int = 64,
                            skip: tuple[str, ...] = ()) -> StorageReport:
    """Write `model` into `folder` with int8 / int4 weights in the compressed-tensors format; `model` is not changed.

    Returns what was stored how (`StorageReport`); modules kept in full precision are logged with the reason.
    """
    from ..extras import require_extra

    require_extra("the compressed-tensors format", "compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor

    reason = blocker(model)
    if reason is not None:
        raise ValueError(f"compressed-tensors cannot store this model: {reason}")
    copied, report, kept = _quantized_copy(model, linear_bits, embedding_bits, group_size, skip)
    for name, why in kept.items():
        logger.info("compressed-tensors: %s stays in full precision (%s)", name, why)
    compressor = ModelCompressor.from_pretrained_model(copied, quantization_format=PACKED_FORMAT)
    compressor.compress_model(copied)
    folder = Path(folder)
    copied.save_pretrained(folder)
    compressor.update_config(str(folder))  # the quantization_config transformers reads (quant_method, groups)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return report


# A model in memory is in this format when it was loaded from such a folder: transformers' compressed-tensors
# quantizer compresses it again in `save_pretrained`. A full-precision model is written into it by explicit choice
# (`save_compressed_tensors`, `save_compressed(storage=...)`).
EXPORT_FORMAT = ExportFormat(
    "compressed-tensors", "transformers", lambda folder: saved_quant_method(folder) == QUANT_METHOD,
    "int8 / int4 weights in the compressed-tensors format (needs the compressed-tensors package)",
    requires=("compressed-tensors",),
    holds=lambda model: quant_method_in_memory(model) == QUANT_METHOD, write=save_pretrained_with_tokenizer,
)
