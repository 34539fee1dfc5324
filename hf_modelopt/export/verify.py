"""Reload a saved model in a fresh Python process and check that it computes what the model in memory did.

A model that saves without error can still reload wrong: a weight saved in a layout the loader reads
differently (bitsandbytes on CPU repacks 4-bit weights in place on the first forward), a config field the
loader ignores, a custom format whose loading hook was never registered. Only a fresh process proves what a
user gets from `from_pretrained`: nothing in it is left over from the run that saved the model.

`verify_reload(folder, model, tokenizer, task)` runs a fixed probe batch through the in-memory model, then
`python -m hf_modelopt.export.verify` loads `folder` with the task's `AutoModelFor...` class (after
`import hf_modelopt`, which registers the project's loading hooks) and runs the same batch; the two logit
tensors must agree within tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

PROBE_TEXTS = (
    "a gripping , beautifully acted film .",
    "the plot is thin and the jokes fall flat .",
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "It was the best of times, it was the worst of times",
)


class ReloadError(UserError):
    """The saved model does not reload to the model that was saved."""


@dataclass
class ReloadCheck:
    folder: str
    max_abs_diff: float
    tolerance: float
    seconds: float


def probe_batch(tokenizer, max_length: int = 32) -> dict:
    """The fixed probe batch (padded, so padding paths are exercised too)."""
    return dict(tokenizer(list(PROBE_TEXTS), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))


def probe_logits(model, batch: dict):
    """Float32 logits of `model` on `batch`, on CPU, in eval mode, padded positions zeroed."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    model.train(was_training)
    if logits.dim() == 3:  # token-level logits: padding positions are arbitrary, compare real tokens only
        logits = logits * batch["attention_mask"].unsqueeze(-1).to(logits.dtype)
    return logits


def verify_reload(folder, model, tokenizer, task: str, atol: float = 1e-4, rtol: float = 1e-4,
                  timeout: float = 900) -> ReloadCheck:
    """Reload `folder` in a fresh process and compare its logits with `model`'s on the probe batch.

    Raises `ReloadError` (naming the folder and the largest difference) when they differ by more than
    `atol + rtol * |reference|`, or when the folder does not load at all.
    """
    import time

    from safetensors.torch import load_file, save_file

    started = time.perf_counter()
    folder = Path(folder)
    batch = probe_batch(tokenizer)
    reference = probe_logits(model, batch)
    with tempfile.TemporaryDirectory(prefix="hf-modelopt-verify-") as scratch:
        probe, result = Path(scratch) / "probe.safetensors", Path(scratch) / "result.safetensors"
        save_file({k: v.contiguous() for k, v in batch.items()}, str(probe))
        command = [sys.executable, "-m", "hf_modelopt.export.verify", str(folder), "--task", task,
                   "--probe", str(probe), "--output", str(result)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ReloadError(f"{folder}: the saved model does not load in a fresh process: {last}")
        reloaded = load_file(str(result))["logits"]
    if reloaded.shape != reference.shape:
        raise ReloadError(f"{folder}: the reloaded model's logits have shape {tuple(reloaded.shape)}, "
                          f"the model in memory gave {tuple(reference.shape)}")
    difference = (reloaded - reference).abs()
    max_abs_diff = float(difference.max())
    allowed = atol + rtol * reference.abs()
    if not bool((difference <= allowed).all()):
        raise ReloadError(f"{folder}: the model reloaded in a fresh process computes different logits than the "
                          f"model in memory (max |difference| {max_abs_diff:.3g}, tolerance {atol:g} + {rtol:g}·|x|)")
    return ReloadCheck(str(folder), max_abs_diff, atol, round(time.perf_counter() - started, 1))


def _reload_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load a saved model and write its logits on a probe batch.")
    parser.add_argument("folder")
    parser.add_argument("--task", required=True)
    parser.add_argument("--probe", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    from safetensors.torch import load_file, save_file

    import hf_modelopt  # noqa: F401  (registers the project's loading hooks, as a user's import would)
    from hf_modelopt.modeling import auto_model_class

    model = auto_model_class(args.task).from_pretrained(args.folder)
    logits = probe_logits(model, load_file(args.probe))
    save_file({"logits": logits.contiguous()}, args.output)
    print(json.dumps({"folder": args.folder, "shape": list(logits.shape)}))


if __name__ == "__main__":
    _reload_main()
