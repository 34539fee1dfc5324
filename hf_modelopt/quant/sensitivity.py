"""Sensitivity scan: how much each block (or linear layer) hurts when it alone is quantized.

For every unit, the weights of its quantizable linear layers are replaced by their quantize-dequantize
round trip (bitsandbytes' own NF4 / FP4 block quantization, or LLM.int8's row-wise int8), the calibration
batches run through the model, and the result is compared with the full-precision model: the mean KL
divergence of the output distributions (never negative, steady on a few samples, so it ranks units) and the
change of the task loss (next-token NLL, or classification cross-entropy). The original weights are then
put back. Units are kept in full precision from the most sensitive down, within a size budget.

This simulates weight quantization only (LLM.int8 also routes outlier activations through fp16, and the
CPU 4-bit kernel rounds block scales to bf16); it ranks units, the final metrics come from the real model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .bnb import BLOCKSIZE_4BIT, linear_layers

logger = logging.getLogger("hf_modelopt")

BLOCK_NAME = re.compile(r"^(.*\.(?:layers|layer|h|blocks)\.\d+)\.")  # decoder / encoder block prefixes


@dataclass
class UnitSensitivity:
    unit: str  # block prefix or linear layer name
    layers: list[str]
    parameters: int
    kl: float  # mean KL(full precision || unit quantized) per token / example
    loss: float  # task loss with the unit quantized
    loss_delta: float  # ... minus the full-precision loss
    kept: bool = False


def fake_quantize_weight(weight, method: str):
    """The weight bitsandbytes would compute with, in the weight's dtype: quantized, then dequantized."""
    import torch

    if method == "int8":  # LLM.int8 weights: one absmax scale per output row
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        return (torch.round(weight / scale).clamp(-127, 127) * scale).to(weight.dtype)
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(weight.contiguous().float(), blocksize=BLOCKSIZE_4BIT,
                                                 quant_type=method)
    return bnb_functional.dequantize_4bit(packed, state).to(weight.dtype).reshape(weight.shape)


def scan_units(names: list[str], granularity: str) -> dict[str, list[str]]:
    """Group linear layer names into scan units: their block (`model.layers.3`) or each layer by itself."""
    units: dict[str, list[str]] = {}
    for name in names:
        match = BLOCK_NAME.match(name) if granularity == "block" else None
        units.setdefault(match.group(1) if match else name, []).append(name)
    return units


def _outputs(model, batches, reference=None):
    """(task loss, KL to `reference` log-probs) over `batches`, and the log-probs (bf16, to keep memory low)."""
    import torch
    import torch.nn.functional as F

    from ..distill.trainer import task_cross_entropy

    total_loss, total_kl, count, log_probs = 0.0, 0.0, 0, []
    with torch.inference_mode():
        for index, batch in enumerate(batches):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits.float()
            # Without labels, a causal LM's target is its own text; a classifier has no loss to report.
            labels = batch.get("labels", inputs.get("input_ids") if logits.dim() == 3 else None)
            if labels is not None:
                total_loss += task_cross_entropy(logits, labels.to(logits.device)).item()
            current = F.log_softmax(logits, dim=-1)
            if reference is not None:
                target = reference[index].float()
                kl = (target.exp() * (target - current)).sum(-1)
                if kl.dim() == 2:  # tokens: average over real tokens
                    mask = inputs.get("attention_mask", torch.ones_like(kl)).to(kl.dtype)
                    kl = (kl * mask).sum() / mask.sum()
                total_kl += kl.mean().item()
            else:
                log_probs.append(current.to(torch.bfloat16))
            count += 1
    return total_loss / count, total_kl / count, log_probs


def sensitivity_scan(model, batches, method: str, candidates: list[str], granularity: str = "block"):
    """Quantize each unit of `candidates` (linear layer names) alone and measure; returns `UnitSensitivity`s,
    most sensitive first. `model` is changed only while a unit is measured."""
    import torch
    from tqdm.auto import tqdm

    from ..distributed import gather_work, share_of_work

    model.eval()
    modules = dict(model.named_modules())
    base_loss, _, reference = _outputs(model, batches)
    results = []
    # The units are independent trials: under several processes each one measures its share of them.
    units = share_of_work(list(scan_units(candidates, granularity).items()))
    for unit, layers in tqdm(units, desc="Sensitivity", unit="unit"):
        originals = {name: modules[name].weight.data for name in layers}
        try:
            with torch.no_grad():
                for name in layers:
                    modules[name].weight.data = fake_quantize_weight(originals[name], method)
            loss, kl, _ = _outputs(model, batches, reference)
        finally:
            for name in layers:
                modules[name].weight.data = originals[name]
        results.append(UnitSensitivity(unit=unit, layers=layers, parameters=sum(
            modules[name].weight.numel() for name in layers), kl=kl, loss=loss, loss_delta=loss - base_loss))
    results = gather_work(results)
    results.sort(key=lambda r: r.kl, reverse=True)
    logger.info("sensitivity: %d units scanned, full-precision loss %.4f; most sensitive: %s", len(results),
                base_loss, ", ".join(f"{r.unit} (KL {r.kl:.2e})" for r in results[:3]))
    return results


def bytes_per_weight(method: str, double_quant: bool = False) -> float:
    """Storage per quantized weight including its scales (4-bit: one fp32 absmax per 64-weight block)."""
    if method == "int8":
        return 1.0
    return 0.5 + (1.0 if double_quant else 4.0) / BLOCKSIZE_4BIT


def choose_kept_units(results: list[UnitSensitivity], full_size_bytes: int, method: str, double_quant: bool,
                      max_size_mb: float | None = None, keep_fraction: float | None = None) -> list[str]:
    """Mark the units kept in full precision (most sensitive first) and return their names.

    `full_size_bytes` is the estimated size with every candidate quantized; each kept unit adds its weights'
    full-precision bytes (4 per weight) minus their quantized bytes. With `max_size_mb`, a unit that does not
    fit is passed over and smaller, less sensitive ones may still fit.
    """
    per_weight = bytes_per_weight(method, double_quant)
    kept = []
    if keep_fraction is not None:
        for result in results[: math.floor(keep_fraction * len(results))]:
            result.kept = True
            kept.append(result.unit)
        return kept
    size = full_size_bytes
    budget = max_size_mb * 1e6
    for result in results:
        extra = result.parameters * (4 - per_weight)
        if size + extra <= budget:
            size += extra
            result.kept = True
            kept.append(result.unit)
    if size > budget:
        logger.warning("sensitivity: even with every layer quantized the model (~%.1f MB) exceeds max_size_mb=%g",
                       size / 1e6, max_size_mb)
    return kept


def estimated_quantized_size(model, skipped: set[str], method: str, double_quant: bool) -> int:
    """Bytes of `model` with every linear layer not in `skipped` quantized (parameters and buffers)."""
    full = model.get_memory_footprint()
    per_weight = bytes_per_weight(method, double_quant)
    modules = dict(model.named_modules())
    saved = 0
    for name in linear_layers(model):
        if name not in skipped:
            weight = modules[name].weight
            saved += weight.numel() * (weight.element_size() - per_weight)
    return int(full - saved)


def write_sensitivity_report(results: list[UnitSensitivity], folder: str | Path, method: str) -> dict[str, Path]:
    """`sensitivity.json`, `sensitivity.md` (a table) and `sensitivity.png` (a bar chart) in `folder`."""
    from ..extras import require_extra

    require_extra("the sensitivity plot", "matplotlib")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "sensitivity.json", "markdown": folder / "sensitivity.md",
             "plot": folder / "sensitivity.png"}
    paths["json"].write_text(json.dumps([asdict(r) for r in results], indent=2))
    lines = [f"Sensitivity to {method} (one unit quantized at a time, most sensitive first)", "",
             "| unit | parameters | KL to full precision | loss change | kept |", "|---|---|---|---|---|"]
    lines += [f"| `{r.unit}` | {r.parameters:,} | {r.kl:.3e} | {r.loss_delta:+.4f} | {'yes' if r.kept else ''} |"
              for r in results]
    paths["markdown"].write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ordered = sorted(results, key=lambda r: _natural_key(r.unit))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.22 * len(ordered) + 2), 3.6))
    axes.bar(range(len(ordered)), [r.kl for r in ordered],
             color=["tab:orange" if r.kept else "tab:blue" for r in ordered])
    axes.set_xticks(range(len(ordered)), [_short(r.unit) for r in ordered], rotation=90, fontsize=7)
    axes.set_ylabel("KL to full precision")
    axes.set_yscale("log")
    axes.set_title(f"{method} sensitivity per unit (orange: kept in full precision)", fontsize=9)
    figure.tight_layout()
    figure.savefig(paths["plot"], dpi=120)
    plt.close(figure)
    return paths


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _short(name: str) -> str:
    return re.sub(r"^(model|bert|transformer|encoder)\.", "", name)
