"""The output folder is the run's own: locked while a run writes into it, recognised as a run folder only by the
run marker, and nothing the run did not write is ever deleted, inside it or outside (issue 28, cases 1-4).

The real CLI runs in subprocesses, as a user runs it.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from hf_modelopt.errors import UserError
from hf_modelopt.export.record import EXPORT_RECORD
from hf_modelopt.files import sha256_file
from hf_modelopt.pipeline import LOCK_FILE, RUN_MARKER, claim_output_dir, run_recipe
from hf_modelopt.recipe import validate_recipe

from .conftest import REPO, tiny_recipe


def hf_modelopt(*args, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "hf_modelopt.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def snapshot(folder):
    """Every file under `folder` with its size and modification time."""
    return {f.relative_to(folder).as_posix(): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(folder.rglob("*")) if f.is_file()}


def one_error_line(result):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


@pytest.fixture
def recipe_file(tiny_models, sst2_files, tmp_path):
    stages = [{"type": "evaluate", "name": "before"}, "finetune", {"type": "export", "verify": False}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)))
    return path


def test_rerun_of_the_export_keeps_user_files_and_deletes_nothing_outside(recipe_file, tmp_path):
    """Cases 1 and 4: a crafted export.json and `--rerun-from export` run from inside the folder; a user's plot."""
    out = tmp_path / "runs" / "out"
    assert hf_modelopt("run", recipe_file, "--output-dir", out).returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("not the run's")
    (out / "sub").mkdir()
    (out / "sub" / "data.txt").write_text("a user's data")
    (out / "notes.txt").write_text("a user's notes")
    (out / "plots").mkdir(exist_ok=True)
    (out / "plots" / "mine.png").write_bytes(b"\x89PNG a user's plot")
    record = json.loads((out / EXPORT_RECORD).read_text())
    record["files"].update({"stages/../../../victim.txt": 7, "../../victim.txt": {"size": 13,
                            "sha256": sha256_file(victim)}, "sub/data.txt": 13, "notes.txt": 14})
    (out / EXPORT_RECORD).write_text(json.dumps(record))

    result = hf_modelopt("run", recipe_file, "--output-dir", ".", "--rerun-from", "export", cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert victim.read_text() == "not the run's"
    assert (out / "sub" / "data.txt").read_text() == "a user's data"
    assert (out / "notes.txt").read_text() == "a user's notes"
    assert (out / "plots" / "mine.png").read_bytes() == b"\x89PNG a user's plot"
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert set(record["files"]) >= {"model.safetensors", "config.json", "recipe.yaml", "README.md"}
    assert not any(name.startswith(("sub", "notes", "..", "stages")) for name in record["files"])
    for name, entry in record["files"].items():
        assert sha256_file(out / name) == entry["sha256"] and (out / name).stat().st_size == entry["size"], name


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(recipe_file, tmp_path):
    """Case 2: the folder is locked (flock) by the run writing into it; a second run is refused in one line."""
    out = tmp_path / "out"
    lock = claim_output_dir(out)  # this process holds it, as a running `hf-modelopt run` would
    try:
        before = snapshot(out)
        refused = one_error_line(hf_modelopt("run", recipe_file, "--output-dir", out))
        assert f"--output-dir {out}: in use by another hf-modelopt run (pid {os.getpid()} on " in refused
        assert socket.gethostname() in refused and " UTC)" in refused
        assert snapshot(out) == before and not (out / "stages").exists()
    finally:
        os.close(lock)
    assert hf_modelopt("run", recipe_file, "--output-dir", out).returncode == 0  # released: the folder is usable
    assert (out / "model.safetensors").is_file() and (out / EXPORT_RECORD).is_file()


def test_two_runs_into_one_folder_the_second_is_refused_the_first_completes(tiny_models, sst2_files, tmp_path):
    """Case 2 as reported: a second run started while the first is running, into the same folder."""
    import time

    data = tiny_recipe(tiny_models("bert"), sst2_files)  # with the export's fresh-process check: seconds of work
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "hf_modelopt.cli", "run", str(recipe), "--output-dir", str(out)],
                             cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while f'"pid": {first.pid}' not in ((out / LOCK_FILE).read_text() if (out / LOCK_FILE).is_file() else ""):
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the first run never claimed the folder"
        time.sleep(0.05)
    with pytest.raises(UserError, match=f"in use by another hf-modelopt run \\(pid {first.pid} on "):
        run_recipe(validate_recipe(data), out)
    assert first.wait() == 0, first.stderr.read()[-3000:]
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["reload_check"]["passed"] and (out / "model.safetensors").is_file()
    for name, entry in record["files"].items():
        assert sha256_file(out / name) == entry["sha256"], name


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from hf_modelopt.pipeline import claim_output_dir; "
                               "claim_output_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)",
                               str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"in use by another hf-modelopt run \\(pid {holder.pid} on "):
        claim_output_dir(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    os.close(claim_output_dir(out))  # the kernel released the dead process's lock
    assert (out / LOCK_FILE).is_file() and (out / RUN_MARKER).is_file()


def test_a_folder_with_stages_but_no_run_marker_is_not_an_earlier_run(recipe_file, tiny_models, sst2_files, tmp_path):
    """Case 3: a user's folder that happens to hold `stages/` is refused, with --overwrite too; nothing deleted."""
    userdir = tmp_path / "userdir"
    (userdir / "stages" / "finetune").mkdir(parents=True)
    (userdir / "stages" / "finetune" / "important.txt").write_text("mine")
    before = snapshot(userdir)
    for options in ([], ["--overwrite"], ["--resume"]):
        refused = one_error_line(hf_modelopt("run", recipe_file, "--output-dir", userdir, *options))
        assert f"{userdir}" in refused and (RUN_MARKER in refused or "not empty" in refused), refused
        assert snapshot(userdir) == before
    recipe = validate_recipe(yaml.safe_load(recipe_file.read_text()))
    with pytest.raises(UserError, match="has a stages/ folder but no .hf-modelopt-run.json"):
        run_recipe(recipe, userdir, overwrite=True)
    assert snapshot(userdir) == before
