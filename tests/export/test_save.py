"""Exports are all or nothing (killed mid-way, replaced), and a commit never deletes what it did not write."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from hf_modelopt.export.commit import PENDING, commit_export, staging_dir
from hf_modelopt.export.record import EXPORT_RECORD
from hf_modelopt.files import UnsafePathError, sha256_file

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
    for name, entry in record["files"].items():
        assert (out / name).stat().st_size == entry["size"] and sha256_file(out / name) == entry["sha256"], name
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
    """Files, and an export.json listing them with size and sha256 (as `export_model` writes it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    if manifest:
        listed = {name: {"size": len(text), "sha256": sha256_file(folder / name)} for name, text in files.items()}
        (folder / EXPORT_RECORD).write_text(json.dumps({"files": listed}))


def tree(folder):
    return sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())


def test_commit_replaces_the_previous_export_and_keeps_the_stages_and_user_files(tmp_path):
    out = tmp_path / "out"
    make_export(out, {"adapter_config.json": "old", "README.md": "old card", "plots/old.png": "png",
                      "tokenizer.json": "old", "notes.md": "exported"})
    (out / "stages" / "finetune").mkdir(parents=True)
    (out / "stages" / "finetune" / "stage.json").write_text("{}")
    (out / "run.log").write_text("another tool's file")
    (out / "plots" / "mine.png").write_text("a user's plot, added after the run")
    (out / "notes.md").write_text("exported, then edited by the user")
    stage_inode = (out / "stages" / "finetune" / "stage.json").stat().st_ino
    staging = staging_dir(out)
    make_export(staging, {"config.json": "new", "README.md": "new card", "plots/new.png": "png"})

    commit_export(staging, out)
    assert not staging.exists() and not (out / PENDING).exists()
    # Gone: the previous export's own files, unchanged since, that the new export lacks (adapter_config.json,
    # plots/old.png, tokenizer.json). Kept: the user's files and the exported file the user edited.
    assert tree(out) == ["README.md", "config.json", "export.json", "notes.md", "plots/mine.png", "plots/new.png",
                         "run.log", "stages/finetune/stage.json"]
    assert (out / "README.md").read_text() == "new card"
    assert (out / "stages" / "finetune" / "stage.json").stat().st_ino == stage_inode  # untouched


def test_commit_into_a_new_folder(tmp_path):
    out = tmp_path / "fresh" / "out"
    staging = staging_dir(out)
    make_export(staging, {"config.json": "new"})
    commit_export(staging, out)
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "export.json"] and not staging.exists()


def test_crafted_manifest_deletes_nothing_outside_nor_user_files(tmp_path):
    """Case 1 of issue 28, at the commit: a crafted export.json names files outside the folder and user files."""
    victim = tmp_path / "victim.txt"
    victim.write_text("outside the output folder")
    out = tmp_path / "a" / "out"
    make_export(out, {"sub/data.txt": "user data", "notes.txt": "user notes"}, manifest=False)
    (out / "stages").mkdir()
    crafted = {"stages/../../../victim.txt": {"size": 25, "sha256": sha256_file(victim)},  # the right hash even
               "../../victim.txt": 25, "sub/data.txt": 9, "notes.txt": {"size": 10, "sha256": "0" * 64}}
    (out / EXPORT_RECORD).write_text(json.dumps({"files": crafted}))
    staging = staging_dir(out)
    make_export(staging, {"config.json": "new"})

    commit_export(staging, out)
    assert victim.read_text() == "outside the output folder"
    assert tree(out) == ["config.json", "export.json", "notes.txt", "sub/data.txt"]


def test_interrupted_commit_is_finished_by_the_next(tmp_path):
    """A commit killed after export.json was removed: the next commit still knows the files it may remove."""
    out = tmp_path / "out"
    make_export(out, {"adapter_config.json": "old", "README.md": "old card"})
    (out / PENDING).write_text(json.dumps({"files": {"adapter_config.json": [sha256_file(out / "adapter_config.json")],
                                                     "README.md": [sha256_file(out / "README.md")]}}))
    (out / EXPORT_RECORD).unlink()  # killed here: no export.json, the pending list names what the export wrote
    (out / "mine.txt").write_text("a user's file")
    staging = staging_dir(out)
    make_export(staging, {"config.json": "new", "README.md": "new card"})
    commit_export(staging, out)
    assert tree(out) == ["README.md", "config.json", "export.json", "mine.txt"]


def test_commit_refuses_to_write_through_a_symlinked_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    make_export(out, {"config.json": "old"})
    (out / "plots").symlink_to(elsewhere)
    staging = staging_dir(out)
    make_export(staging, {"config.json": "new", "plots/new.png": "png"})
    with pytest.raises(UnsafePathError, match="outside"):
        commit_export(staging, out)
    assert list(elsewhere.iterdir()) == [] and (out / "config.json").read_text() == "old"  # nothing changed
    assert (out / EXPORT_RECORD).is_file()
