"""The figures a model card reports about a model besides its metrics: parameters, sparsity, size, latency.

They are measured on the model as a user loads it (`verify.py` runs them in a fresh process), and the
latency names the hardware, because a latency without its CPU and thread count means nothing.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

from ..formats.detect import weights_size_on_disk

LATENCY_BATCH_SIZE = 32
LATENCY_SEQ_LEN = 64


def parameter_count(model) -> int:
    """Parameters as the model defines them (bitsandbytes 4-bit storage packs two per byte: counted as two)."""
    if hasattr(model, "get_nb_trainable_parameters"):  # a peft model: base model plus adapter
        return int(model.get_nb_trainable_parameters()[1])
    return int(model.num_parameters())


def linear_zero_fraction(model) -> float | None:
    """Fraction of exactly-zero weights over the weights of the Linear layers (GPT-2's Conv1D included): the
    figure the export reports as `linear_sparsity` (not `prune.linear_sparsity`, a schedule).

    `None` when a Linear weight is quantized (integer storage: a zero code is not always a zero weight, and
    packed 4-bit bytes hold two weights) or there is no Linear layer.
    """
    from ..formats.modules import is_linear, zero_fraction

    weights = [module.weight for module in model.modules() if is_linear(module)]
    if not weights or not all(weight.is_floating_point() for weight in weights):
        return None
    return zero_fraction(*weights)


def cpu_name() -> str:
    """The CPU model as the OS names it (e.g. from /proc/cpuinfo), else what `platform` reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


weights_size = weights_size_on_disk  # (the name the export and bench use; the rule lives in formats.detect)


def base_model_folder(spec) -> Path | None:
    """Where the recipe's base model lies on disk: its local folder, or its snapshot in the HF cache."""
    if spec.is_local:
        return Path(spec.name_or_path).expanduser()
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.name_or_path, spec.gguf_file or "config.json", revision=spec.revision)
    return Path(cached).parent if isinstance(cached, str) else None


def model_figures(model) -> dict:
    return {"parameters": parameter_count(model), "linear_sparsity": linear_zero_fraction(model)}


def cpu_latency(models: dict, repeats: int, warmup: int = 2) -> dict:
    """Median CPU forward latency of each model at batch 32 x 64 tokens, interleaved in this process."""
    import torch

    results = compare_latency(models, LATENCY_BATCH_SIZE, LATENCY_SEQ_LEN, repeats, warmup=warmup)
    return {"latency_ms": {name: r["latency_ms"] for name, r in results.items()},
            "setup": {"batch_size": LATENCY_BATCH_SIZE, "seq_len": LATENCY_SEQ_LEN, "repeats": repeats,
                      "threads": torch.get_num_threads(), "cpu": cpu_name(), "torch": torch.__version__}}


def random_batch(model, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    """Random inputs of the model's task (`Task.random_inputs`: tokens, images, sources and targets); tokens for a
    model of no registered task."""
    import torch

    from ..tasks import TASKS, model_task
    from ..tasks.task import random_token_inputs

    task = model_task(model)
    make = TASKS[task].random_inputs if task is not None else random_token_inputs
    batch = make(model, batch_size, seq_len, torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def compare_latency(models: dict[str, object], batch_size: int = 32, seq_len: int = 64, repeats: int = 20,
                    warmup: int = 3, progress: bool = False) -> dict[str, dict[str, float]]:
    """Median forward latency (ms) and throughput (sequences/s) of each model on the same random batch."""
    import torch
    from tqdm.auto import tqdm

    batches = {name: random_batch(model, batch_size, seq_len) for name, model in models.items()}
    timings: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
        rounds = tqdm(range(warmup + repeats), desc=f"latency, batch {batch_size}", unit="round", disable=not progress)
        for round_ in rounds:
            for name, model in models.items():
                started = time.perf_counter()
                model(**batches[name])
                if round_ >= warmup:
                    timings[name].append(time.perf_counter() - started)
    results = {}
    for name, values in timings.items():
        median = statistics.median(values)
        results[name] = {"latency_ms": median * 1000, "sequences_per_s": batch_size / median,
                         "batch_size": batch_size, "seq_len": seq_len, "threads": torch.get_num_threads(),
                         "repeats": repeats}
    return results


def format_latency_table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    reference = results[names[0]]["latency_ms"]
    any_result = results[names[0]]
    lines = [f"batch {any_result['batch_size']}, length {any_result['seq_len']}, {any_result['threads']} threads, "
             f"median of {any_result['repeats']} interleaved runs",
             f"{'model':<40} {'latency ms':>11} {'seq/s':>9} {'speed-up':>9}"]
    for name in names:
        r = results[name]
        lines.append(f"{name:<40} {r['latency_ms']:>11.1f} {r['sequences_per_s']:>9.1f} "
                     f"{reference / r['latency_ms']:>8.2f}x")
    return "\n".join(lines)
