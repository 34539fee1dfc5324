"""Real models on real data, as a user runs them. Minutes each: marked slow (python -m pytest -m slow)."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO

RECIPE_DATA = REPO.parent / "shared" / "data"  # where the shipped recipes' data_dir points (relative to them)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (RECIPE_DATA / "sst2").is_dir(), reason="needs ../shared/data"),
]


def cli(*args):
    result = subprocess.run([sys.executable, "-m", "hf_modelopt.cli", *map(str, args)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_quickstart_improves_and_reloads_to_the_same_metric(tmp_path):
    out = tmp_path / "out"
    cli("run", "recipes/quickstart.yaml", "--output-dir", out)
    before, after = (m["metrics"]["accuracy"] for m in json.loads((out / "metrics.json").read_text()))
    assert before < 0.6 < 0.8 < after
    remeasured = json.loads(cli("eval", out, "--recipe", "recipes/quickstart.yaml", "--json").stdout.splitlines()[-1])
    assert remeasured["accuracy"] == after
    assert json.loads((out / "export.json").read_text())["metrics"] == remeasured  # the card's figures


def test_smollm2_gguf_perplexity_and_safetensors_export(tmp_path):
    out = tmp_path / "out"
    cli("run", "recipes/smollm2/baseline.yaml", "--output-dir", out)
    perplexity = json.loads((out / "metrics.json").read_text())[0]["metrics"]["perplexity"]
    assert 20 < perplexity < 35  # ../shared/data/README.md: 26.1 for the same file and windows
    assert (out / "model.safetensors").is_file() and "quantization_config" not in (out / "config.json").read_text()


def test_smollm2_distill_recipe_runs_and_reloads(tmp_path):
    """A few steps of the SmolLM2 distill recipe: a 15-layer student that loads with plain transformers."""
    out = tmp_path / "out"
    cli("run", "recipes/smollm2/distill.yaml", "--output-dir", out, "--set", "stages.1.training.max_steps=3",
        "--set", "data.max_eval_tokens=2048")
    teacher, student = (m["metrics"]["perplexity"] for m in json.loads((out / "metrics.json").read_text()))
    assert 5 < teacher < student
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).num_hidden_layers == 15


def test_sst2_minilm_nf4_keeps_the_teachers_accuracy_and_reloads(tmp_path):
    """NF4 of the fine-tuned teacher (reused from the stage cache when it exists): classifier skipped, >= 99 %."""
    out = tmp_path / "out"
    cli("run", "recipes/sst2-minilm/nf4.yaml", "--output-dir", out)
    teacher, nf4 = (m["metrics"]["accuracy"] for m in json.loads((out / "metrics.json").read_text()))
    assert nf4 >= 0.99 * teacher
    report = json.loads((out / "quantization.json").read_text())
    assert list(report["skipped"]) == ["classifier"] and report["metrics"]["reload_max_abs_diff"] <= 1e-4


def test_smollm2_int8_recipe_runs_and_reloads(tmp_path):
    out = tmp_path / "out"
    cli("run", "recipes/smollm2/int8.yaml", "--output-dir", out, "--set", "data.max_eval_tokens=2048")
    fp32, int8 = (m["metrics"]["perplexity"] for m in json.loads((out / "metrics.json").read_text()))
    assert int8 < fp32 * 1.05
    assert '"load_in_8bit": true' in (out / "config.json").read_text()


def test_digits_vit_learns_from_scratch(tmp_path):
    subprocess.run([sys.executable, "scripts/prepare_digits.py", tmp_path / "digits-data"], cwd=REPO, check=True,
                   capture_output=True)
    out = tmp_path / "out"
    data = tmp_path / "digits-data"
    cli("run", "recipes/digits-vit/finetune.yaml", "--output-dir", out, "--set", f"data.data_dir={data}",
        "--set", f"model.name_or_path={data / 'vit-tiny'}", "--set", "training.num_train_epochs=10")
    before, after = (m["metrics"]["accuracy"] for m in json.loads((out / "metrics.json").read_text()))
    assert before < 0.2 < 0.8 < after  # 10 epochs of the recipe's 50 (95.6 %, BENCHMARKS.md)
