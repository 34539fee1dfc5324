"""The behaviour matrix: every technique x every architecture of `tests/conftest.py`'s `ARCHITECTURES` and the
families issue 30 added (`tests/matrix/common.py`'s `NEW_FAMILIES`: mixture-of-experts, mixed attention, shared
layers, stages, Linear subclasses).

Which pairs are supported is the library's own declaration (`hf_modelopt.compat.unsupported_reason`, e.g.
structured pruning's `LAYOUTS`), never a list kept here. A supported pair runs for real and its result is
checked (loss finite and weights changed, sparsity reached, parameters removed, logits equal after a
fresh-process reload, ...); any other pair must be refused by the verb with one `UnsupportedModelError` line
naming the technique and the model type, before any work: the model's state dict is unchanged afterwards.
The outcome is written up by hand in docs/architectures.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from hf_modelopt.compat import UnsupportedModelError, unsupported_reason
from tests.conftest import REPO, TASK_AUTO_CLASSES
from tests.matrix.common import (
    MATRIX_ARCHITECTURES,
    assert_state_unchanged,
    logits_of,
    model_inputs,
    natural_task,
    state_snapshot,
    tiny_model,
)

warnings.filterwarnings("ignore", message=".*bos_token_id.*|.*eos_token_id.*")


def training_args(tmp_path, steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_steps=1, seed=0)


def rows(model_type: str, count: int) -> list[dict]:
    """`count` single examples (the Trainer's default collator stacks them into batches)."""
    return [{k: v[0] for k, v in model_inputs(model_type, seed=i, batch=1).items()} for i in range(count)]


def assert_refused(technique: str, model, call) -> None:
    """`call()` raises one UnsupportedModelError line naming the technique and the model type, and leaves
    `model` as it was."""
    reason = unsupported_reason(technique, model)
    assert reason is not None
    before = state_snapshot(model)
    with pytest.raises(UnsupportedModelError) as refused:
        call()
    message = str(refused.value)
    assert "\n" not in message
    assert technique in message and repr(model.config.model_type) in message and reason in message
    assert "supports" in message
    assert_state_unchanged(model, before)


def changed_parameters(model, before: dict[str, torch.Tensor]) -> list[str]:
    return [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]


# --------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("model_type", MATRIX_ARCHITECTURES)
def test_distillation(model_type, tmp_path):
    from hf_modelopt import DistillationConfig, DistillationTrainer
    from hf_modelopt.distill import student_from_teacher

    teacher = tiny_model(model_type)
    # Hidden-state KD pairs the layers of one block stack; an encoder-decoder has two, so it distils the logits.
    one_stack = not teacher.config.is_encoder_decoder
    config = DistillationConfig(ce_weight=0.5, hidden_weight=0.5 if one_stack else 0.0)

    def make_trainer():
        return DistillationTrainer(model=student, teacher=teacher, distillation=config,
                                   args=training_args(tmp_path, 2), train_dataset=rows(model_type, 4))

    if unsupported_reason("distillation", teacher):
        student = tiny_model(model_type)  # the refusal is DistillationTrainer's, whatever the student
        student_before = state_snapshot(student)
        assert_refused("distillation", teacher, make_trainer)
        assert_state_unchanged(student, student_before)
        return
    if unsupported_reason("students from teacher layers", teacher):  # (ALBERT's shared layers, Swin's stages)
        assert_refused("students from teacher layers", teacher, lambda: student_from_teacher(teacher, layers=[1]))
        student = tiny_model(model_type)  # a student of the teacher's own shape: distillation itself works
    else:
        student, copied_from = student_from_teacher(teacher, layers=[1])
        assert copied_from == [1] and student.config.num_hidden_layers == 1
    teacher_before, student_before = state_snapshot(teacher), state_snapshot(student)
    trainer = make_trainer()
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 2 and len(logged) == 2
    for entry in logged:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["kd_loss"]) and math.isfinite(entry["ce_loss"])
        assert math.isfinite(entry["hidden_loss"]) if one_stack else "hidden_loss" not in entry
    assert changed_parameters(student, student_before)
    assert_state_unchanged(teacher, teacher_before)


# --------------------------------------------------------------------------- gradual pruning


@pytest.mark.parametrize("model_type", MATRIX_ARCHITECTURES)
def test_gradual_pruning(model_type, tmp_path):
    from transformers import Trainer

    from hf_modelopt import PruningCallback, PruningConfig, prune_
    from hf_modelopt.prune import ScheduleConfig
    from hf_modelopt.prune.masks import sparsity_of
    from hf_modelopt.prune.schedule import scheduled_sparsity

    model = tiny_model(model_type)
    config = PruningConfig(sparsity=0.5, schedule=ScheduleConfig(start_step=0, end_step=2, update_every=1))
    callback = PruningCallback(config)
    trainer = Trainer(model=model, args=training_args(tmp_path, 3), train_dataset=rows(model_type, 6),
                      callbacks=[callback])
    if unsupported_reason("gradual pruning", model):
        assert_refused("gradual pruning", model, trainer.train)
        assert trainer.state.global_step == 0
        assert_refused("gradual pruning", model, lambda: prune_(model, config))
        return
    trainer.train()
    updates = [entry for entry in trainer.state.log_history if "target_sparsity" in entry]
    # An update at every step where the schedule's target rises (step 0's target is 0: nothing to prune).
    rising = [step for step in range(1, 4) if scheduled_sparsity(callback.schedule, step, 0.5)
              > scheduled_sparsity(callback.schedule, step - 1, 0.5)]
    assert [entry["step"] for entry in updates] == rising == [1, 2]
    for entry in updates:  # the masks hold what the schedule says at each update, to the weight
        expected = scheduled_sparsity(callback.schedule, entry["step"], 0.5)
        assert entry["target_sparsity"] == pytest.approx(expected, abs=1e-6)
        assert expected <= entry["sparsity"] <= expected + 0.01
    assert updates[-1]["target_sparsity"] == 0.5
    assert sparsity_of(callback.modules) == pytest.approx(0.5, abs=0.01)  # and it stays after the last step
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


# --------------------------------------------------------------------------- one-shot pruning


@pytest.mark.parametrize("model_type", MATRIX_ARCHITECTURES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_one_shot_pruning(method, model_type):
    from hf_modelopt import OneShotPruningConfig, prune_
    from hf_modelopt.prune.masks import prunable_linears

    model = tiny_model(model_type)
    batches = [model_inputs(model_type, labels=False, seed=seed) for seed in range(2)]
    config = OneShotPruningConfig(method=method, sparsity=0.5)
    if unsupported_reason("one-shot pruning", model):
        assert_refused("one-shot pruning", model, lambda: prune_(model, config, batches=batches))
        return
    report = prune_(model, config, batches=batches)
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert set(report["per_layer"]) == set(prunable_linears(model))
    assert all(abs(value - 0.5) < 0.02 for value in report["per_layer"].values()), report["per_layer"]
    assert torch.isfinite(logits_of(model, model_type)).all()
    if method != "magnitude":  # the calibration data decided: not the weights' magnitude alone
        by_magnitude = tiny_model(model_type)
        prune_(by_magnitude, OneShotPruningConfig(method="magnitude", sparsity=0.5))
        assert any(not torch.equal(module.weight != 0, prunable_linears(by_magnitude)[name].weight != 0)
                   for name, module in prunable_linears(model).items())


# --------------------------------------------------------------------------- structured pruning


@pytest.mark.parametrize("model_type", MATRIX_ARCHITECTURES)
def test_structured_pruning(model_type):
    from hf_modelopt import StructuredPruningConfig, prune_
    from hf_modelopt.prune.structured import head_geometry, parameter_count

    model = tiny_model(model_type)
    config = StructuredPruningConfig(heads=0.5, neurons=0.5)
    batches = [model_inputs(model_type, seed=seed) for seed in range(2)]
    if unsupported_reason("structured pruning", model):
        assert_refused("structured pruning", model, lambda: prune_(model, config, batches=batches))
        return
    before = parameter_count(model)
    report = prune_(model, config, batches=batches)
    assert report["parameters_before"] == before
    assert report["parameters_after"] == parameter_count(model) < before
    heads, _, _ = head_geometry(tiny_model(model_type).config)
    assert all(0 < len(kept) < heads for kept in report["kept_heads"])
    logits = logits_of(model, model_type)
    assert logits.shape == logits_of(tiny_model(model_type), model_type).shape and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- bitsandbytes quantization


@pytest.mark.parametrize("model_type", MATRIX_ARCHITECTURES)
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantization(method, model_type):
    import bitsandbytes as bnb

    from hf_modelopt import QuantizationConfig, quantize

    model = tiny_model(model_type, wide=method == "nf4")  # 4-bit CPU kernels need 64-wide layers
    config = QuantizationConfig(method=method)
    if unsupported_reason("quantization", model):
        assert_refused("quantization", model, lambda: quantize(model, config))
        return
    before = state_snapshot(model)
    reference = logits_of(model, model_type)
    quantized = quantize(model, config)
    assert_state_unchanged(model, before)  # quantize returns a copy
    report = quantized.quantization_report
    assert report.quantized and report.footprint_bytes < report.reference_footprint_bytes
    layer_type = bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit
    modules = dict(quantized.named_modules())
    assert all(isinstance(modules[name], layer_type) for name in report.quantized)
    logits = logits_of(quantized, model_type)
    assert torch.isfinite(logits).all()
    # Quantization error, not a broken model: close to full precision relative to the logits' spread (measured
    # on these models: int8 at most 0.11, NF4 at most 0.47; a broken model is at 1 or more).
    spread = (reference - reference.mean(-1, keepdim=True)).norm()
    assert (logits - reference).norm() / spread < {"int8": 0.25, "nf4": 0.6}[method]


@pytest.mark.parametrize("model_type", MATRIX_ARCHITECTURES)
def test_quantization_with_calibration(model_type):
    from hf_modelopt import QuantizationConfig, quantize
    from hf_modelopt.quant import SensitivityConfig

    model = tiny_model(model_type)
    config = QuantizationConfig(method="int8", sensitivity=SensitivityConfig(keep_fraction=0.5,
                                                                             calibration_samples=2))
    calibration = [model_inputs(model_type, seed=seed) for seed in range(2)]
    if unsupported_reason("quantization with calibration", model):
        assert_refused("quantization with calibration", model,
                       lambda: quantize(model, config, calibration=calibration))
        return
    quantized = quantize(model, config, calibration=calibration)
    results = quantized.sensitivity_results
    assert results and all(math.isfinite(r.kl) and math.isfinite(r.loss) for r in results)
    kept = [layer for r in results if r.kept for layer in r.layers]
    assert kept and not set(kept) & set(quantized.quantization_report.quantized)
    assert quantized.quantization_report.quantized
    assert torch.isfinite(logits_of(quantized, model_type)).all()


# --------------------------------------------------------------------------- export + fresh-process reload


def _sparse(model):
    from hf_modelopt import PruningConfig, prune_

    prune_(model, PruningConfig(sparsity=0.5))
    return model, {"sparse": True}


def _storage_int8(model):
    from hf_modelopt.quant import StorageQuantizationConfig

    return model, {"storage": StorageQuantizationConfig(linear_bits=8, embedding_bits=8)}


def _bitsandbytes_nf4(model):
    from hf_modelopt import QuantizationConfig, quantize

    return quantize(model, QuantizationConfig(method="nf4")), {}


def _structured(model):
    from hf_modelopt import StructuredPruningConfig, prune_

    prune_(model, StructuredPruningConfig(heads=0.5, neurons=0.5, importance="magnitude"))
    return model, {}


# export format -> (prepare(model) -> (model, save_compressed kwargs), the technique the preparation runs (whose
# refusal the export inherits), wide model?, formats it may be written in, logits tolerance: absolute, or relative
# to the logits' spread for storage quantization, lossy by design: measured at most 0.018 (T5), 0.007 elsewhere).
EXPORTS = {
    "sparse": (_sparse, "gradual pruning", False, {"hf-modelopt"}, 1e-5),
    "storage-int8": (_storage_int8, "export", False, {"compressed-tensors", "hf-modelopt"}, "relative 0.05"),
    "bitsandbytes-nf4": (_bitsandbytes_nf4, "quantization", True, {"bitsandbytes"}, 1e-5),
    "structured": (_structured, "structured pruning", False, {"dense", "hf-modelopt"}, 1e-5),
}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """{(format, model_type): (expected logits, reloaded logits, format name) or the refusal}: every architecture
    saved in every format with `save_compressed`, then all reloaded in ONE fresh process (a process start and
    the transformers import cost seconds each; the worker loads the plain-transformers folders before
    importing hf_modelopt)."""
    from hf_modelopt import save_compressed

    root = tmp_path_factory.mktemp("exports")
    results, manifest = {}, []
    for export, (prepare, _, wide, _, _) in EXPORTS.items():
        for model_type in MATRIX_ARCHITECTURES:
            folder, logits_file = root / export / model_type, root / export / f"{model_type}.pt"
            try:
                model, options = prepare(tiny_model(model_type, wide=wide))
                expected = logits_of(model, model_type)
                export_format = save_compressed(model, folder, **options)
            except UnsupportedModelError as refused:
                results[export, model_type] = refused
                continue
            results[export, model_type] = (expected, logits_file, export_format.name)
            manifest.append({"model_type": model_type, "folder": str(folder), "logits_file": str(logits_file),
                             "auto_class": TASK_AUTO_CLASSES[natural_task(model_type)],
                             "loads_with": export_format.loads_with})
    (root / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "tests.matrix.reload_worker", str(root / "manifest.json")],
                   cwd=REPO, env=env, check=True, timeout=300)
    return {key: r if isinstance(r, Exception) else (r[0], torch.load(r[1]), r[2]) for key, r in results.items()}


@pytest.mark.parametrize("model_type", MATRIX_ARCHITECTURES)
@pytest.mark.parametrize("export", list(EXPORTS))
def test_export_reloads_in_a_fresh_process(export, model_type, exported):
    _, technique, wide, formats, tolerance = EXPORTS[export]
    result = exported[export, model_type]
    if isinstance(result, UnsupportedModelError):  # refused by the technique the export follows, or the export
        assert unsupported_reason(technique, tiny_model(model_type, wide=wide)) is not None
        assert technique in str(result) and repr(model_type) in str(result)
        return
    assert unsupported_reason(technique, tiny_model(model_type, wide=wide)) is None
    expected, reloaded, format_name = result
    assert format_name in formats
    if isinstance(tolerance, str):
        spread = (expected - expected.mean(-1, keepdim=True)).norm()
        assert (reloaded - expected).norm() / spread < float(tolerance.split()[1])
    else:
        torch.testing.assert_close(reloaded, expected, atol=tolerance, rtol=0)
