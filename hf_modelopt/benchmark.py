"""`hf-modelopt bench`: models side by side, measured in one process so that ratios are fair.

For every model: the recipe's metrics on its evaluation data (the task's `main_metric` in the table: accuracy,
perplexity, F1, ROUGE-L, ...), parameters, weights
on disk, peak memory, and latency and throughput at batch 1 and 32. Latency runs are interleaved
(model A, model B, model A, ...) so that machine noise hits every model alike; the median over `repeats`
timed runs is reported, after `warmup` untimed ones. Peak memory is the one figure measured elsewhere: in
a fresh process per model (the peak resident memory of loading it and running one batch, over a process
that has only imported the libraries), since a process's peak cannot be taken apart per model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .export.measure import compare_latency, format_latency_table, random_batch  # noqa: F401  (re-exported)


def greedy_generation_seconds(model, input_ids, new_tokens: int, pad_token_id: int) -> float:
    """Seconds `model` takes to generate exactly `new_tokens` greedy tokens after `input_ids` (no padding, KV
    cache on); a `RuntimeError` if it stopped early."""
    import time

    import torch

    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, use_cache=True,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id)
    seconds = time.perf_counter() - started
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - input_ids.shape[1]} tokens, not {new_tokens}")
    return seconds


def interleaved_generation_seconds(models: dict[str, Any], input_ids, new_tokens: int, pad_token_id: int,
                                   repeats: int) -> dict[str, list[float]]:
    """name -> `repeats` timings of `greedy_generation_seconds`, after one untimed warm-up each; in every round the
    models take turns, so that machine noise hits them alike."""
    for model in models.values():
        greedy_generation_seconds(model, input_ids, new_tokens, pad_token_id)
    seconds = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            seconds[name].append(greedy_generation_seconds(model, input_ids, new_tokens, pad_token_id))
    return seconds


# --------------------------------------------------------------------------- the full benchmark


@dataclass
class Candidate:
    """One model of a benchmark.

    `load()` builds it in this process. `memory_loader` tells the peak-memory child process how to build
    it: a folder (loaded as its export format says), or `FILE.py:FUNCTION` called with `memory_argument`.
    """

    name: str
    load: Callable[[], Any]
    tokenizer: Any = None
    size_bytes: int | None = None
    memory_loader: str | None = None
    memory_argument: str = ""
    trust_remote_code: bool = False  # the user's --trust-remote-code, passed on to the peak-memory process
    notes: str = ""
    extra: dict = field(default_factory=dict)


def folder_candidate(path, task: str, name: str | None = None, trust_remote_code: bool = False) -> Candidate:
    """A saved model (an export folder, a stage's `model/` folder, a Hub id in the cache) as a candidate.

    `trust_remote_code` is passed to every `from_pretrained` as a bool: transformers' default (None) would ask
    y/N on a terminal before running code shipped with the model.
    """
    from .export.measure import weights_size
    from .inspection import load_config
    from .tasks import get_task

    path = str(path)

    def load():
        if os.path.isdir(path):
            from .formats.detect import load_exported

            return load_exported(path, get_task(task).auto_class, get_task(task).peft_auto_class,
                                 trust_remote_code=trust_remote_code)
        import transformers

        return getattr(transformers, get_task(task).auto_class).from_pretrained(path,
                                                                               trust_remote_code=trust_remote_code)

    load_config(path, trust_remote_code)  # refuses, before any model is measured, code the user did not allow
    size = weights_size(path) if os.path.isdir(path) else None
    return Candidate(name or path, load, tokenizer=_tokenizer(path, trust_remote_code), size_bytes=size,
                     memory_loader=path, trust_remote_code=trust_remote_code)


def _tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # a folder without a tokenizer: the recipe's model's tokenizer is used
        return None


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _load_for_memory(loader: str, argument: str, task: str, trust_remote_code: bool = False):
    if os.path.isdir(loader) or ":" not in loader:
        return folder_candidate(loader, task, trust_remote_code=trust_remote_code).load()
    import importlib.util

    file, function = loader.rsplit(":", 1)
    spec = importlib.util.spec_from_file_location("hf_modelopt_bench_builder", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function)(argument)


def _peak_memory_main(argv: list[str]) -> None:
    """Child process: print the peak resident memory (MB) of loading one model and running one forward."""
    import argparse

    parser = argparse.ArgumentParser()
    for name in ("loader", "argument", "task"):
        parser.add_argument(name)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    import torch
    import transformers  # noqa: F401  (the libraries count in the baseline, not in the model's memory)

    import hf_modelopt  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = _status_kb("VmRSS")
    model = _load_for_memory(args.loader, args.argument, args.task, args.trust_remote_code).eval()
    with torch.inference_mode():
        model(**random_batch(model, args.batch_size, args.seq_len))
    peak = _status_kb("VmHWM")
    if peak is None or baseline is None:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS) has no baseline
        import resource

        peak, baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin"
                                                                                  else 1), 0
    print(json.dumps({"peak_mb": (peak - baseline) / 1024}))


def peak_memory_mb(candidate: Candidate, task: str, batch_size: int, seq_len: int) -> float | None:
    """Peak memory of `candidate` (MB) measured in a fresh process; `None` when it cannot be rebuilt there."""
    if candidate.memory_loader is None:
        return None
    import torch

    command = [sys.executable, "-m", "hf_modelopt.benchmark", candidate.memory_loader, candidate.memory_argument or "-",
               task, "--batch-size", str(batch_size), "--seq-len", str(seq_len),
               "--threads", str(torch.get_num_threads())] + ["--trust-remote-code"] * candidate.trust_remote_code
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peak memory of {candidate.name}: the measuring process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def run_benchmark(candidates: list[Candidate], recipe=None, batch_sizes=(1, 32), seq_len: int = 64,
                  repeats: int = 20, warmup: int = 3, memory: bool = True) -> dict:
    """Measure every candidate (see the module docstring); the first is the reference of every ratio."""
    import torch
    from tqdm.auto import tqdm

    from .export.measure import cpu_name, parameter_count
    from .tasks import get_task

    task = recipe.task if recipe is not None else "text-classification"
    models, rows = {}, []
    for candidate in tqdm(candidates, desc="bench: loading and evaluating", unit="model"):
        model = candidate.load().eval()
        models[candidate.name] = model
        row = {"name": candidate.name, "parameters": parameter_count(model), "size_mb": _mb(candidate.size_bytes),
               "notes": candidate.notes, **candidate.extra}
        if recipe is not None:
            from .metrics import evaluate_model
            from .modeling import load_tokenizer

            tokenizer = candidate.tokenizer or load_tokenizer(recipe.model, task=recipe.task)
            row["metrics"] = evaluate_model(model, tokenizer, recipe.data, task=recipe.task)
        if memory:
            row["peak_memory_mb"] = peak_memory_mb(candidate, task, max(batch_sizes), seq_len)
        rows.append(row)
    for batch_size in batch_sizes:
        timings = compare_latency(models, batch_size, seq_len, repeats, warmup, progress=True)
        for row in rows:
            timing = timings[row["name"]]
            row.setdefault("latency_ms", {})[str(batch_size)] = timing["latency_ms"]
            row.setdefault("sequences_per_s", {})[str(batch_size)] = timing["sequences_per_s"]
    metric = get_task(task).main_metric if recipe is not None else None
    return {"setup": {"task": task, "metric": metric, "lower_is_better": get_task(task).lower_is_better,
                      "batch_sizes": list(batch_sizes), "seq_len": seq_len, "repeats": repeats, "warmup": warmup,
                      "threads": torch.get_num_threads(), "cpu": cpu_name(), "device": "cpu",
                      "torch": torch.__version__, "recipe": None if recipe is None else str(recipe.source)},
            "models": rows}


def _mb(size: int | None) -> float | None:
    return None if size is None else size / 1e6


def format_benchmark(result: dict) -> str:
    """The Markdown table of `run_benchmark`'s result (ratios against the first model)."""
    setup, rows = result["setup"], result["models"]
    metric, reference = setup["metric"], rows[0]
    big = str(max(setup["batch_sizes"]))

    def ratio(value, base, inverse=False):
        if value is None or base is None or not value:
            return "n/a"
        return f"{(base / value) if inverse else (value / base):.2f}×"

    header = ["model"] + ([metric] if metric else []) + [
        "parameters", "weights on disk (MB)", "smaller", f"peak memory (MB, batch {big})"]
    header += [f"latency ms (batch {b})" for b in setup["batch_sizes"]]
    header += [f"seq/s (batch {b})" for b in setup["batch_sizes"]] + [f"faster (batch {big})"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"]]
        if metric:
            value = row["metrics"][metric]
            base = reference["metrics"][metric]
            # (a higher-is-better metric also as a share of the reference's: "98.7 %" of its accuracy)
            relative = not setup.get("lower_is_better") and base
            cells.append(f"{value:.4f} ({100 * value / base:.1f} %)" if relative else f"{value:.2f}")
        size = row["size_mb"]
        peak = row.get("peak_memory_mb")
        cells += [f"{row['parameters'] / 1e6:.1f} M", "n/a" if size is None else f"{size:.1f}",
                  ratio(size, reference["size_mb"], inverse=True), "n/a" if peak is None else f"{peak:.0f}"]
        cells += [f"{row['latency_ms'][str(b)]:.1f}" for b in setup["batch_sizes"]]
        cells += [f"{row['sequences_per_s'][str(b)]:.1f}" for b in setup["batch_sizes"]]
        cells.append(ratio(row["latency_ms"][big], reference["latency_ms"][big], inverse=True))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{setup['device']}: {setup['cpu']}, {setup['threads']} threads, torch {setup['torch']}; sequences "
                 f"of {setup['seq_len']} tokens; latency is the median of {setup['repeats']} interleaved runs after "
                 f"{setup['warmup']} warm-up runs; ratios against the first row.")
    notes = [f"- {row['name']}: {row['notes']}" for row in rows if row.get("notes")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_benchmark(result: dict, output_dir) -> list[Path]:
    """bench.json, bench.md and, with a metric, METRIC_vs_latency.png and METRIC_vs_size.png (the task's
    `main_metric`: accuracy_vs_latency.png for a classifier)."""
    from .extras import require_extra

    if result["setup"]["metric"] is not None:
        require_extra("bench's plots", "matplotlib")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "bench.json", output_dir / "bench.md"]
    written[0].write_text(json.dumps(result, indent=2))
    written[1].write_text(format_benchmark(result))
    metric = result["setup"]["metric"]
    if metric is None:
        return written
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["models"]
    big = str(max(result["setup"]["batch_sizes"]))
    for x_key, label, against in ((lambda r: r["latency_ms"][big], f"latency (ms, batch {big})", "latency"),
                                  (lambda r: r["size_mb"], "weights on disk (MB)", "size")):
        points = [(x_key(r), r["metrics"][metric], r["name"]) for r in rows if x_key(r) is not None]
        figure, axis = plt.subplots(figsize=(9, 4.5))
        markers = "osD^v<>pP*Xh"
        for index, (x, y, name) in enumerate(points):  # a legend entry each: labels of close points overlap
            axis.scatter(x, y, label=name, marker=markers[index % len(markers)], s=45)
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        axis.set_xlabel(label)
        axis.set_ylabel(metric)
        axis.set_xscale("log")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        path = output_dir / f"{metric}_vs_{against}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


if __name__ == "__main__":
    _peak_memory_main(sys.argv[1:])
