"""bitsandbytes quantization: which layers can be quantized and `quantize_with_bitsandbytes`.

Two things about bitsandbytes (0.50) on CPU shape this module:

- Its 4-bit CPU kernels reject some layer shapes. The first forward pass repacks each 4-bit weight into a
  CPU layout (`bitsandbytes.functional._convert_weight_packed_for_cpu`), which asserts that the output
  features are a multiple of 32 (`N must be divisible by block_n`) and reshapes the per-block scales to
  `[out_features, in_features // blocksize]`, so the input features must be a multiple of the 64-weight
  quantization block. A 2-output classifier head fails the first rule; such layers stay in full precision.
- That repacking happens in place and cannot be undone faithfully when saving, so `quantize_with_bitsandbytes`
  keeps the quantized state from before any forward pass (`formats.bitsandbytes.keep_pristine_state`), which the
  bitsandbytes format's writer (`formats.bitsandbytes.save_bitsandbytes`) writes once the model has run.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UserError
from ..formats.bitsandbytes import keep_pristine_state, written_tensors
from ..formats.bnb_layers import linear_layers  # noqa: F401  (re-exported: the rule transformers applies)
from .config import QuantizationConfig

logger = logging.getLogger("hf_modelopt")

# bitsandbytes' CPU layout packs 32 output rows together; transformers quantizes 4-bit weights in blocks of 64.
CPU_4BIT_ROW_BLOCK = 32
BLOCKSIZE_4BIT = 64


class QuantizationError(UserError):
    """A model cannot be quantized as asked."""


@dataclass
class QuantizationReport:
    """What `quantize` did: the layers quantized, the ones kept in full precision and why, the footprint."""

    method: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> reason
    # Parameters that are no Linear layer's and stay in full precision, with the reason: the fused 3-D expert
    # weights of mixture-of-experts blocks (`formats.experts`), which transformers' bitsandbytes integration does
    # not convert.
    kept_parameters: dict[str, str] = field(default_factory=dict)
    # Every parameter of the transformer blocks (norms, biases, routers, fused experts included), and how many of
    # them are stored quantized: what "quantized" means for the blocks as a whole.
    block_parameters: int = 0
    quantized_block_parameters: int = 0
    # Bytes of the tensors the bitsandbytes writer writes (tied weights once): the weights' part of the saved file.
    footprint_bytes: int = 0
    reference_footprint_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def kernel_rejects(in_features: int, out_features: int, method: str) -> str | None:
    """Why bitsandbytes' CPU kernels cannot run a `method` layer of this shape, or None when they can."""
    if method == "int8":
        return None  # LLM.int8 on CPU takes any shape (checked down to 2 x 32)
    if out_features % CPU_4BIT_ROW_BLOCK:
        return f"4-bit CPU kernel needs out_features divisible by {CPU_4BIT_ROW_BLOCK}, got {out_features}"
    if in_features % BLOCKSIZE_4BIT:
        return f"4-bit CPU kernel needs in_features divisible by {BLOCKSIZE_4BIT}, got {in_features}"
    return None


def plan_skips(model, config: QuantizationConfig, keep_modules=()) -> dict[str, str]:
    """Linear layers that stay in full precision, with the reason: output head / tied weights (transformers'
    defaults), shapes the kernels reject, `config.skip_modules`, and `keep_modules` (e.g. from a sensitivity scan).
    """
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    layers = linear_layers(model)
    skipped: dict[str, str] = {}
    for name in get_keys_to_not_convert(model):
        if name in layers:
            skipped[name] = "output head or tied weights (transformers keeps them in full precision)"
    for name, (in_features, out_features) in layers.items():
        reason = kernel_rejects(in_features, out_features, config.method)
        if name in skipped:
            continue
        if reason:
            skipped[name] = reason
        elif not should_convert_module(name, config.skip_modules):
            skipped[name] = "skip_modules"
        elif not should_convert_module(name, list(keep_modules)):
            skipped[name] = "sensitivity scan: kept in full precision"
    return skipped


def quantize_with_bitsandbytes(model, config: QuantizationConfig, keep_modules=(), work_dir: str | Path | None = None):
    """Quantize `model` with bitsandbytes as `config` says; returns `(quantized_model, QuantizationReport)`.

    The model is written to a scratch folder (safetensors) and loaded back with a `BitsAndBytesConfig`,
    transformers' supported way to quantize, so the result saves and loads like any bnb checkpoint. The
    input model is not changed. The quantized state is also kept in memory as it was before any forward
    pass (`keep_pristine_state`), so that the bitsandbytes writer can write it after the model has run (see above).
    """
    from ..extras import require_extra

    require_extra("bitsandbytes quantization", "bitsandbytes")
    skipped = plan_skips(model, config, keep_modules)
    layers = linear_layers(model)
    quantized_names = [name for name in layers if name not in skipped]
    if not quantized_names:
        raise QuantizationError(
            f"no linear layer of {type(model).__name__} can be quantized to {config.method}: "
            + "; ".join(f"{name}: {reason}" for name, reason in list(skipped.items())[:3])
        )
    for name, reason in skipped.items():
        logger.info("quantize: %s stays in full precision (%s)", name, reason)
    logger.info("quantize: %d linear layers to %s, %d kept in full precision",
                len(quantized_names), config.method, len(skipped))
    bnb_config = config.to_bnb_config(skip_modules=sorted(skipped))
    with tempfile.TemporaryDirectory(prefix="hf-modelopt-quantize-", dir=work_dir) as scratch:
        model.save_pretrained(scratch)
        quantized = type(model).from_pretrained(scratch, quantization_config=bnb_config)
    quantized.eval()
    # transformers keeps some layers in full precision on its own (a model's `_keep_in_fp32_modules`, such as T5's
    # `wo`; skip names matched as suffixes: `classifier` keeps `pre_classifier`): the report says what was converted.
    converted = {name for name, module in quantized.named_modules() if _is_bnb_layer(module)}
    for name in [name for name in quantized_names if name not in converted]:
        quantized_names.remove(name)
        skipped[name] = "kept in full precision by transformers (_keep_in_fp32_modules or a skip name it matches)"
    # What save_pretrained would write now, before a CPU forward pass repacks 4-bit weights in place.
    pristine = keep_pristine_state(quantized)
    # The scratch folder is gone: a name that points nowhere must not end up in saved configs and adapters.
    quantized.config._name_or_path = getattr(model.config, "_name_or_path", "")
    kept_parameters = {name: FUSED_EXPERTS_REASON for name in fused_expert_parameters(quantized)}
    for name in kept_parameters:
        logger.info("quantize: %s stays in full precision (%s)", name, FUSED_EXPERTS_REASON)
    block_total, block_quantized = block_parameter_counts(quantized, converted)
    report = QuantizationReport(
        method=config.method, quantized=quantized_names, skipped=skipped, kept_parameters=kept_parameters,
        block_parameters=block_total, quantized_block_parameters=block_quantized,
        footprint_bytes=saved_bytes(quantized, pristine),
        reference_footprint_bytes=saved_bytes(model, model.state_dict()),
    )
    if kept_parameters:
        logger.warning("quantize: %d fused expert weights (%s%s) stay in full precision: %.0f %% of the blocks' "
                       "parameters are quantized", len(kept_parameters), ", ".join(list(kept_parameters)[:2]),
                       ", ..." if len(kept_parameters) > 2 else "", 100 * block_quantized / max(block_total, 1))
    return quantized, report


FUSED_EXPERTS_REASON = ("fused 3-D expert weights: transformers' bitsandbytes integration converts Linear layers "
                        "only, so they stay in full precision")


def fused_expert_parameters(model) -> list[str]:
    """Names of the fused 3-D expert parameters of `model` (`formats.experts`)."""
    from ..formats.experts import EXPERT_WEIGHTS, experts_modules

    return [f"{name}.{param}" for name, experts in experts_modules(model).items() for param in EXPERT_WEIGHTS
            if experts._parameters.get(param) is not None]


def block_parameter_counts(model, converted: set[str]) -> tuple[int, int]:
    """(every parameter of the transformer blocks, those held by bitsandbytes layers), counted in weights: a 4-bit
    weight packs two per byte, so its stored elements are doubled back."""
    from ..blocks import layer_stacks

    total = quantized = 0
    for stack in layer_stacks(model):
        for name, module in stack.layers.named_modules():
            own = sum(_weights_in(param) for param in module.parameters(recurse=False))
            total += own
            if f"{stack.path}.{name}" in converted:
                quantized += own
    return total, quantized


def _weights_in(param) -> int:
    quant_state = getattr(param, "quant_state", None)
    return int(quant_state.shape.numel()) if quant_state is not None else param.numel()


def saved_bytes(model, state_dict: dict) -> int:
    """Bytes of the tensors saving `model` with `state_dict` writes: the safetensors file is these plus its header."""
    return sum(tensor.numel() * tensor.element_size() for tensor in written_tensors(model, state_dict).values())


def _is_bnb_layer(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))

