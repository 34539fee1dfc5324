"""The command line, run as a user would: in subprocesses, reloading outputs in fresh processes."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO, tiny_recipe


def hf_modelopt(*args, env=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "hf_modelopt.cli", *map(str, args)], capture_output=True,
                            text=True, env=env, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def write_recipe(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_then_reload_in_a_fresh_process(tiny_models, sst2_files, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_models("bert"), sst2_files))
    out = tmp_path / "out"
    run = hf_modelopt("run", recipe, "--output-dir", out, "--set", "training.max_steps=2")
    assert "Done." in run.stdout and "after" in run.stdout
    summary = run.stdout[run.stdout.index("stages:"):]  # every stage with its time or "reused", then the export
    assert all(name in summary for name in ("finetune", "export (re-measured in a fresh process)"))
    assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["max_steps"] == 2
    recorded = json.loads((out / "metrics.json").read_text())[-1]["metrics"]

    # Plain transformers in a new process, no hf_modelopt import.
    code = ("import sys; from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T; "
            "m = M.from_pretrained(sys.argv[1]); t = T.from_pretrained(sys.argv[1]); "
            "print(m(**t(['a fine film'], return_tensors='pt')).logits.shape)")
    loaded = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0 and "torch.Size([1, 2])" in loaded.stdout, loaded.stderr[-2000:]

    # Re-measured in a fresh process: the same metrics as metrics.json.
    remeasured = json.loads(hf_modelopt("eval", out, "--recipe", recipe, "--json").stdout.strip().splitlines()[-1])
    assert remeasured == recorded


# Five subprocesses: `slow` for the default suite's time. The same errors are checked in-process in
# tests/test_recipe.py and tests/test_bad_input.py, and the exit status of a bad run in a subprocess by
# test_run_recipe_script_is_the_same_entry_point below.
@pytest.mark.slow
def test_bad_recipes_exit_non_zero_with_one_line_and_no_output(tiny_models, sst2_files, tmp_path):
    good = tiny_recipe(tiny_models("bert"), sst2_files)
    cases = {
        "misspelled": ({**good, "traning": {}}, "traning"),
        "wrong-type": ({**good, "training": {**good["training"], "max_steps": "many"}}, "training.max_steps"),
        "missing-data": ({**good, "data": {**good["data"], "eval_file": "sst2/gone.tsv"}}, "data.eval_file"),
        "unknown-stage": ({**good, "stages": ["finetune", "quantise"]}, "stages[1].type"),
    }
    for name, (data, key) in cases.items():
        out = tmp_path / f"out-{name}"
        result = hf_modelopt("run", write_recipe(tmp_path / f"{name}.yaml", data), "--output-dir", out, check=False)
        assert result.returncode != 0, name
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and key in errors[0] and f"{name}.yaml" in errors[0], result.stderr
        assert not out.exists(), name


def test_inspect_reports_sizes_and_tensor_stats(tiny_models):
    folder = tiny_models("llama", "causal-lm")
    report = json.loads(hf_modelopt("inspect", folder, "--json").stdout)
    assert report["model"] == "LlamaForCausalLM" and report["dtypes"] == ["float32"]
    assert report["size_on_disk_bytes"] > 0 and report["size_in_memory_bytes"] >= report["parameters"] * 4
    layer = next(t for t in report["tensors"] if t["name"].endswith("layers.0.mlp.up_proj.weight"))
    assert layer["shape"] == [64, 32] and layer["min"] < layer["mean"] < layer["max"]
    table = hf_modelopt("inspect", folder).stdout
    assert "parameters:" in table and "model.layers.0.mlp.up_proj.weight" in table


def test_run_recipe_script_is_the_same_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "scripts/run_recipe.py", str(tmp_path / "none.yaml"), "--output-dir",
                             str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "recipe file not found" in result.stderr


@pytest.mark.slow  # (keeps the default suite under 15 min; runs with -m slow)
def test_bench_measures_models_side_by_side(tiny_models, sst2_files, tmp_path):
    bert, distilbert = tiny_models("bert"), tiny_models("distilbert")
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(bert, sst2_files))
    out = hf_modelopt("bench", bert, distilbert, "--recipe", recipe, "--output-dir", tmp_path / "b",
                      "--repeats", "3", "--batch-sizes", "1", "4", "--json").stdout
    result = json.loads(out)
    assert result == json.loads((tmp_path / "b" / "bench.json").read_text())
    assert result["setup"]["metric"] == "accuracy" and result["setup"]["threads"] >= 1
    rows = {row["name"]: row for row in result["models"]}
    assert list(rows) == [str(bert), str(distilbert)]
    for row in rows.values():
        assert 0 <= row["metrics"]["accuracy"] <= 1 and row["metrics"]["eval_samples"] == 32
        assert row["latency_ms"]["1"] > 0 and row["sequences_per_s"]["4"] > 0 and row["peak_memory_mb"] > 0
        assert row["parameters"] > 0 and row["size_mb"] > 0
    table = (tmp_path / "b" / "bench.md").read_text()
    assert table.splitlines()[0].startswith("| model | accuracy | parameters |") and "1.00×" in table
    assert (tmp_path / "b" / "accuracy_vs_latency.png").stat().st_size > 0
    assert (tmp_path / "b" / "accuracy_vs_size.png").stat().st_size > 0
    assert "latency ms (batch 32)" in hf_modelopt("bench", bert, "--repeats", "2", "--no-memory").stdout
