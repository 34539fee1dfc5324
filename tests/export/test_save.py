"""Exports are all or nothing: killed mid-way, replaced, or committed without the atomic swap."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from hf_modelopt.export import save
from hf_modelopt.export.save import EXPORT_RECORD, commit_export, staging_dir

from ..conftest import REPO, tiny_recipe

FINAL_FILES = ("export.json", "README.md", "config.json", "model.safetensors", "recipe.yaml", "metrics.json")


def start_run(recipe, out, *overrides):
    args = [sys.executable, "-m", "hf_modelopt.cli", "run", str(recipe), "--output-dir", str(out)]
    args += [item for override in overrides for item in ("--set", override)]
    return subprocess.Popen(args, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_during_export(run, out):
    """SIGKILL the run (and its verification child) while the export is being verified."""
    staged = staging_dir(out.resolve()) / "recipe.yaml"  # written just before the fresh-process reload starts
    deadline = time.monotonic() + 300
    while not staged.exists():
        assert run.poll() is None, run.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the export never started"
        time.sleep(0.02)
    assert run.poll() is None  # still exporting: verification takes seconds
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()


def assert_complete_export(out):
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["reload_check"]["passed"]
    for name, size in record["files"].items():
        assert (out / name).stat().st_size == size, name
    return record


def test_killed_export_leaves_no_partial_output(tiny_models, sst2_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_models("bert"), sst2_files)))
    out = tmp_path / "out"

    kill_during_export(start_run(recipe, out), out)
    assert not any((out / name).exists() for name in FINAL_FILES)  # nothing of the export, not even the card
    assert (out / "stages" / "finetune" / "stage.json").is_file()  # the finished stages are kept
    with pytest.raises((OSError, ValueError)):  # no config.json there
        AutoModelForSequenceClassification.from_pretrained(out)

    finished = start_run(recipe, out)  # the rerun reuses the stages and exports
    assert finished.wait() == 0, finished.stderr.read()[-3000:]
    first = assert_complete_export(out)
    assert not staging_dir(out.resolve()).exists() and (out / "stages" / "finetune" / "stage.json").is_file()

    # A second export killed mid-way leaves the first one whole, not a mix of the two.
    kill_during_export(start_run(recipe, out, "training.max_steps=2"), out)
    assert assert_complete_export(out) == first
    assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["max_steps"] == 3


def make_export(folder, files, manifest=True):
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    if manifest:
        listed = {name: len(text) for name, text in files.items()}
        (folder / EXPORT_RECORD).write_text(json.dumps({"files": listed}))


@pytest.mark.parametrize("swap", [True, False], ids=["atomic-swap", "in-place-fallback"])
def test_commit_replaces_the_previous_export_and_keeps_the_stages(tmp_path, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(save, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    make_export(out, {"adapter_config.json": "old", "README.md": "old card", "plots/old.png": "png"})
    (out / "stages" / "finetune").mkdir(parents=True)
    (out / "stages" / "finetune" / "stage.json").write_text("{}")
    (out / "run.log").write_text("another tool's file")
    stage_inode = (out / "stages" / "finetune" / "stage.json").stat().st_ino
    staging = staging_dir(out)
    make_export(staging, {"config.json": "new", "README.md": "new card", "plots/new.png": "png"})

    commit_export(staging, out)
    assert not staging.exists()
    assert sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file()) == [
        "README.md", "config.json", "export.json", "plots/new.png", "run.log", "stages/finetune/stage.json"]
    assert (out / "README.md").read_text() == "new card"
    assert (out / "stages" / "finetune" / "stage.json").stat().st_ino == stage_inode  # moved or linked, not copied


def test_commit_into_a_new_folder(tmp_path):
    out = tmp_path / "fresh" / "out"
    staging = staging_dir(out)
    make_export(staging, {"config.json": "new"})
    commit_export(staging, out)
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "export.json"] and not staging.exists()
