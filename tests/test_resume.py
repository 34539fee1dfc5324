"""Interrupting a run (SIGTERM / SIGINT) and resuming it: the same model as a run that was never interrupted."""

import json
import logging
import os
import shlex
import signal
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from hf_modelopt.cli import main
from hf_modelopt.errors import UserError
from hf_modelopt.interrupt import RunInterrupted, stop_cleanly_on_signals, stop_requested, training_in_progress
from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import RecipeError, validate_recipe

from .conftest import REPO, tiny_recipe

STEPS = 16  # 2 epochs of 64 rows at batch 8: the resumed run crosses epoch boundaries


def resumable_recipe(tiny_models, sst2_files):
    stages = [{"type": "evaluate", "name": "before"}, "finetune", {"type": "evaluate", "name": "after"}]
    data = tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)
    data["training"].update(max_steps=STEPS, logging_steps=1)  # one printed log line per step to synchronise on
    return data


def start_and_signal(recipe_file, out, signum):
    """Start `hf-modelopt run` and send `signum` once the first training step has been logged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "hf_modelopt.cli", "run", str(recipe_file), "--output-dir",
                                str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "'loss'" in line:
            process.send_signal(signum)
            break
    lines += process.stdout.readlines()
    return process.wait(timeout=120), "".join(lines)


def test_sigterm_mid_stage_then_resume_gives_the_uninterrupted_result(tiny_models, sst2_files, tmp_path,
                                                                     monkeypatch, caplog):
    data = resumable_recipe(tiny_models, sst2_files)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    with monkeypatch.context() as patch:  # a stage cache of its own: the runs below must not reuse its stages
        patch.setenv("HF_MODELOPT_CACHE", str(tmp_path / "reference-cache"))
        run_recipe(validate_recipe(data), tmp_path / "reference")

    out = tmp_path / "out"
    code, output = start_and_signal(recipe_file, out, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    message = [line for line in output.splitlines() if line.startswith("interrupted by SIGTERM")]
    assert len(message) == 1, output[-3000:]
    checkpoints = list((out / "stages" / "finetune" / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 1 <= stopped_at < STEPS, "the run finished before the signal arrived: no resume tested"
    assert f"checkpoint of step {stopped_at}" in message[0]

    changed = {**data, "training": {**data["training"], "learning_rate": 5e-4}}
    with pytest.raises(RecipeError, match="made with other inputs"):  # refused before any work
        run_recipe(validate_recipe(changed), out, resume=True)
    command = shlex.split(message[0].split("resume with: ")[1])
    assert command[0] == "hf-modelopt" and command[-1] == "--resume"
    with caplog.at_level(logging.INFO, logger="hf_modelopt"):
        assert main(command[1:]) == 0  # in this process: the reference ran here too (same threads, same kernels)
    logged = [record.getMessage() for record in caplog.records]
    assert any("Stage 'before' reused" in line for line in logged)  # finished before the signal: not rerun
    assert any(f"finetune: resuming from {checkpoints[0]}" in line for line in logged)

    assert not (out / "stages" / "finetune" / "checkpoints").exists()  # a finished stage keeps its model only
    history = json.loads((out / "stages" / "finetune" / "log_history.json").read_text())
    reference_history = json.loads((tmp_path / "reference" / "stages" / "finetune" / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses == [entry["loss"] for entry in reference_history if "loss" in entry] and len(losses) == STEPS
    weights, reference = load_file(out / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert all((weights[name] == reference[name]).all() for name in reference)
    assert (json.loads((out / "metrics.json").read_text())
            == json.loads((tmp_path / "reference" / "metrics.json").read_text()))


def test_first_signal_waits_for_the_training_step_a_second_one_stops_at_once():
    # What was installed before (default_int_handler; SIG_IGN where a shell started us in the background)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_cleanly_on_signals():
        with pytest.raises(RunInterrupted) as outside:  # nothing being trained: nothing to wait for
            os.kill(os.getpid(), signal.SIGINT)
        assert outside.value.exit_code == 130 and outside.value.checkpoint is None
        with training_in_progress():
            os.kill(os.getpid(), signal.SIGINT)
            assert stop_requested() == signal.SIGINT  # noted; StopOnSignalCallback ends the step with a save
            with pytest.raises(RunInterrupted):
                os.kill(os.getpid(), signal.SIGTERM)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored


def test_resume_needs_an_earlier_run(tiny_models, sst2_files, tmp_path):
    with pytest.raises(UserError, match="holds no earlier hf-modelopt run"):
        run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files)), tmp_path / "new", resume=True)


def test_resume_from_a_damaged_checkpoint_is_one_line_and_touches_nothing(tiny_models, sst2_files, tmp_path):
    """A truncated or garbage file in the checkpoint: `--resume` names the checkpoint and what to do (exit 2)."""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(resumable_recipe(tiny_models, sst2_files)))
    out = tmp_path / "out"
    code, output = start_and_signal(recipe_file, out, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    (checkpoint,) = (out / "stages" / "finetune" / "checkpoints").glob("checkpoint-*")

    def snapshot():
        return {f.relative_to(out).as_posix(): (f.stat().st_size, f.stat().st_mtime_ns, f.read_bytes())
                for f in sorted(out.rglob("*")) if f.is_file()}

    damages = {"optimizer.pt": lambda data: data[: len(data) // 2], "model.safetensors": lambda data: data[:-100],
               "trainer_state.json": lambda data: b"\x00garbage" + data}
    for name, damage in damages.items():
        original = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(damage(original))
        before = snapshot()
        result = subprocess.run([sys.executable, "-m", "hf_modelopt.cli", "run", str(recipe_file), "--output-dir",
                                 str(out), "--resume"], capture_output=True, text=True, cwd=REPO,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert errors[0].startswith(f"error: --resume: the checkpoint {checkpoint} is damaged: {name} "), errors
        assert errors[0].endswith("run without --resume to start stage 'finetune' over (its checkpoints are then "
                                  "discarded)")
        assert snapshot() == before  # the output folder untouched
        (checkpoint / name).write_bytes(original)
