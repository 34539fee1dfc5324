"""Side-by-side CPU/GPU latency of models, measured in one process so that ratios are fair.

Runs are interleaved (model A, model B, model A, ...) so that machine noise hits every model alike; the
median over `repeats` timed runs is reported, after `warmup` untimed ones.
"""

from __future__ import annotations

import statistics
import time


def random_batch(model, batch_size: int, seq_len: int, seed: int = 0) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def compare_latency(models: dict[str, object], batch_size: int = 32, seq_len: int = 64, repeats: int = 20,
                    warmup: int = 3) -> dict[str, dict[str, float]]:
    """Median forward latency (ms) and throughput (sequences/s) of each model on the same random batch."""
    import torch

    batches = {name: random_batch(model, batch_size, seq_len) for name, model in models.items()}
    timings: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
        for round_ in range(warmup + repeats):
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
