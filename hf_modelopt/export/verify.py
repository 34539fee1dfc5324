"""Reload a saved model in a fresh Python process and check that it computes what the model in memory did.

A model that saves without error can still reload wrong: a weight saved in a layout the loader reads
differently (bitsandbytes on CPU repacks 4-bit weights in place on the first forward), a config field the
loader ignores, a custom format whose loading hook was never registered. Only a fresh process proves what a
user gets from `from_pretrained`: nothing in it is left over from the run that saved the model.

`verify_reload(folder, model, tokenizer, task)` runs a fixed probe batch through the in-memory model, then
`python -m hf_modelopt.export.verify` loads `folder` with the task's `AutoModelFor...` class (after
`import hf_modelopt`, which registers the project's loading hooks; peft adapter folders with peft's
`AutoPeftModelFor...`: see `formats.load_exported`) and runs the same batch; the two logit tensors must agree
within tolerance.

With a `MeasureRequest`, the same fresh process also measures what the model card reports: the metrics on
the evaluation data it names (`metrics.evaluate_model`, as `hf-modelopt eval` computes them), parameters,
Linear-weight sparsity, weights on disk and CPU latency, next to the base model. The request reaches that process
as plain data (the task on the command line, the data and base model settings as JSON it validates back into
`DataConfig` / `ModelConfig`): no recipe is read or validated there.
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

from ..data import DataConfig
from ..errors import UserError
from ..modeling import ModelConfig
from ..tasks import PROBE_TEXTS, get_task, text_probe_batch  # noqa: F401  (PROBE_TEXTS: re-exported)


class ReloadError(UserError):
    """The saved model does not reload to the model that was saved."""


@dataclass
class MeasureRequest:
    """What the fresh process measures besides the probe logits."""

    data: DataConfig  # the evaluation data the metrics are measured on
    base_model: ModelConfig  # the model the run started from: the "before" figures, and the tokenizer of a folder
    # that has none (a bare adapter)
    compare_base: bool = True  # also load `base_model`, for the card's "before" figures
    latency_repeats: int = 10  # timed forward passes per model at batch 32 x 64 tokens; 0 skips latency

    def to_json(self) -> str:
        # data_dir absolute: the fresh process must find the same files whatever its working directory.
        data = self.data.model_copy(update={"data_dir": str(Path(self.data.data_dir).expanduser().resolve())})
        return json.dumps({"data": data.model_dump(mode="json"), "base_model": self.base_model.model_dump(mode="json"),
                           "compare_base": self.compare_base, "latency_repeats": self.latency_repeats})

    @classmethod
    def from_json(cls, text: str, task: str) -> MeasureRequest:
        """The request `to_json` wrote, its data read with `task`'s own data settings class (its columns)."""
        fields = json.loads(text)
        return cls(get_task(task).data_config.model_validate(fields["data"]),
                   ModelConfig.model_validate(fields["base_model"]), fields["compare_base"], fields["latency_repeats"])


@dataclass
class ReloadCheck:
    folder: str
    max_abs_diff: float
    tolerance: float
    seconds: float
    measurements: dict | None = None  # with a MeasureRequest: see `_measure`


def probe_batch(tokenizer, max_length: int = 32, task: str | None = None) -> dict:
    """The fixed probe batch of `task` (default: a text task), padded, so padding paths are exercised too."""
    if task is None:
        return text_probe_batch(tokenizer, max_length)
    return get_task(task).probe_batch(tokenizer)


def probe_logits(model, batch: dict, task: str | None = None):
    """Float32 logits of `model` on `batch`, on CPU, in eval mode, padded positions zeroed.

    A span task's start and end logits come stacked on the last axis (`Task.logits_of`)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        outputs = model(**{k: v.to(device) for k, v in batch.items()})
    logits = (get_task(task).logits_of(outputs) if task is not None else outputs.logits).float().cpu()
    model.train(was_training)
    # Token-level: padding positions are arbitrary. With decoder inputs the logits are the decoder's, masked by
    # their own mask (the seq2seq probe has no decoder padding), not the encoder's.
    mask = batch.get("decoder_attention_mask") if "decoder_input_ids" in batch else batch.get("attention_mask")
    if logits.dim() == 3 and mask is not None:
        logits = logits * mask.unsqueeze(-1).to(logits.dtype)
    return logits


def verify_reload(folder, model, tokenizer, task: str, atol: float = 1e-4, rtol: float = 1e-4,
                  timeout: float = 900, measure: MeasureRequest | None = None) -> ReloadCheck:
    """Reload `folder` in a fresh process and compare its logits with `model`'s on the probe batch.

    Raises `ReloadError` (naming the folder and the largest difference) when they differ by more than
    `atol + rtol * |reference|`, or when the folder does not load at all. With `measure`, the fresh
    process also measures the reloaded model (`ReloadCheck.measurements`).
    """
    import time

    from safetensors.torch import load_file, save_file

    started = time.perf_counter()
    folder = Path(folder)
    batch = probe_batch(tokenizer, task=task)
    reference = probe_logits(model, batch, task)
    with tempfile.TemporaryDirectory(prefix="hf-modelopt-verify-") as scratch:
        probe, result = Path(scratch) / "probe.safetensors", Path(scratch) / "result.safetensors"
        save_file({k: v.contiguous() for k, v in batch.items()}, str(probe))
        measured = Path(scratch) / "measurements.json"
        command = [sys.executable, "-m", "hf_modelopt.export.verify", str(folder), "--task", task,
                   "--probe", str(probe), "--output", str(result)]
        if measure is not None:
            request = Path(scratch) / "measure.json"
            request.write_text(measure.to_json())
            command += ["--measure", str(request), "--measurements", str(measured)]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        except subprocess.TimeoutExpired:
            raise ReloadError(f"{folder}: reloading in a fresh process took over {timeout:g} s") from None
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ReloadError(f"{folder}: the saved model does not load in a fresh process: {last}")
        reloaded = load_file(str(result))["logits"]
        measurements = json.loads(measured.read_text()) if measure is not None else None
    if reloaded.shape != reference.shape:
        raise ReloadError(f"{folder}: the reloaded model's logits have shape {tuple(reloaded.shape)}, "
                          f"the model in memory gave {tuple(reference.shape)}")
    difference = (reloaded - reference).abs()
    max_abs_diff = float(difference.max())
    allowed = atol + rtol * reference.abs()
    if not bool((difference <= allowed).all()):
        raise ReloadError(f"{folder}: the model reloaded in a fresh process computes different logits than the "
                          f"model in memory (max |difference| {max_abs_diff:.3g}, tolerance {atol:g} + {rtol:g}·|x|)")
    return ReloadCheck(str(folder), max_abs_diff, atol, round(time.perf_counter() - started, 1), measurements)


def _exported_tokenizer(folder: Path, base_model: ModelConfig, task: str):
    """The export's own processor (the base model's when the folder has none, e.g. a bare adapter)."""
    from ..modeling import load_tokenizer

    files = ("tokenizer_config.json", "tokenizer.json", "preprocessor_config.json")
    has_tokenizer = any((folder / name).is_file() for name in files)
    return load_tokenizer(base_model, path=str(folder) if has_tokenizer else None, task=task)


def _measure(folder: Path, model, task: str, request: MeasureRequest) -> dict:
    """Metrics on the request's evaluation data and the card's figures, for the export and the base model.

    `{"metrics": {...}, "figures": {"export": {...}, "base": {...} | None}, "latency_setup": {...} | None,
    "base_error": str | None}`; figures hold parameters, linear_sparsity, size_on_disk_bytes, latency_ms.
    """
    import logging

    from ..metrics import evaluate_model
    from ..modeling import load_model
    from .measure import base_model_folder, cpu_latency, model_figures, weights_size

    spec = request.base_model
    metrics = evaluate_model(model, _exported_tokenizer(folder, spec, task), request.data, task=task)
    figures = {"export": {**model_figures(model), "size_on_disk_bytes": weights_size(folder)}, "base": None}
    models, base_error = {"export": model}, None
    if request.compare_base:
        try:
            labels = getattr(model.config, "num_labels", None) if get_task(task).count_labels else None
            base = load_model(spec, task, num_labels=labels)
            base_folder = base_model_folder(spec)
            size = weights_size(base_folder, spec.gguf_file) if base_folder else None
            figures["base"] = {**model_figures(base), "size_on_disk_bytes": size}
            models = {"base": base, "export": model}
        except Exception as err:  # the "before" column is a comparison: without it the export is still valid
            base_error = f"{type(err).__name__}: {err}"
            logging.getLogger("hf_modelopt").warning("base model not measured: %s", base_error)
    latency_setup = None
    if request.latency_repeats > 0:
        latency = cpu_latency(models, request.latency_repeats)
        for name, value in latency["latency_ms"].items():
            figures[name]["latency_ms"] = value
        latency_setup = {**latency["setup"], "device": str(next(model.parameters()).device)}
    return {"metrics": metrics, "figures": figures, "latency_setup": latency_setup, "base_error": base_error}


def _reload_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load a saved model and write its logits on a probe batch.")
    parser.add_argument("folder")
    parser.add_argument("--task", required=True)
    parser.add_argument("--probe", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--measure", help="also measure the model as this MeasureRequest (JSON) says")
    parser.add_argument("--measurements", help="where to write the measurements (JSON)")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file, save_file

    import hf_modelopt  # noqa: F401  (registers the loading hooks, as a user's import does)
    from hf_modelopt.formats.detect import load_exported

    model = load_exported(args.folder, get_task(args.task).auto_class, get_task(args.task).peft_auto_class)
    logits = probe_logits(model, load_file(args.probe), args.task)
    save_file({"logits": logits.contiguous()}, args.output)
    if args.measure:
        request = MeasureRequest.from_json(Path(args.measure).read_text(), args.task)
        measurements = _measure(Path(args.folder), model, args.task, request)
        Path(args.measurements).write_text(json.dumps(measurements, indent=2))
    print(json.dumps({"folder": args.folder, "shape": list(logits.shape)}))


if __name__ == "__main__":
    _reload_main()
