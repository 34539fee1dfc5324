import json
import subprocess
import sys

import pytest

from ..conftest import REPO, tiny_recipe


@pytest.mark.slow
def test_cpu_deployment_options_are_measured_side_by_side(wide_tiny_models, tiny_models, sst2_files, tmp_path):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(wide_tiny_models("bert"), sst2_files)))
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, "scripts/benchmark_cpu_deploy.py", str(wide_tiny_models("bert")), "--recipe",
                          str(recipe), "--output-dir", str(out), "--repeats", "2", "--batch-size", "4", "--seq-len",
                          "16", "--baseline", str(tiny_models("bert"))], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {row["option"]: row for row in json.loads((out / "bench.json").read_text())["rows"]}
    assert {"fp32", "dynamic-int8", "torchao-int8-weight", "torchao-int8-dynamic", "compressed-tensors-int8",
            "fp32 +compile", "torchao-int8-dynamic +compile"} <= set(rows)
    assert rows["fp32"]["speedup_vs_fp32"] == 1.0 and rows["dynamic-int8"]["size_mb"] is None
    assert rows["compressed-tensors-int8"]["size_mb"] < rows["fp32"]["size_mb"]
    # The baseline is timed in the same run; every row reads relative to it too.
    assert rows["baseline fp32"]["speedup_vs_baseline"] == 1.0 and rows["baseline fp32"]["accuracy_vs_baseline"] == 1
    assert rows["fp32"]["speedup_vs_baseline"] == pytest.approx(
        rows["baseline fp32"]["latency_ms"] / rows["fp32"]["latency_ms"], rel=0.02)
    # Every shipped folder reloads without hf_modelopt to the same model; in-memory rows have nothing to reload.
    for name in ("baseline fp32", "fp32", "torchao-int8-weight", "torchao-int8-dynamic", "compressed-tensors-int8"):
        assert rows[name]["plain_reload_max_abs_diff"] is not None and rows[name]["plain_reload_max_abs_diff"] < 1e-4
    assert rows["dynamic-int8"]["plain_reload_max_abs_diff"] is None
    # The accuracy column is the recipe's evaluation data, measured as evaluate_model measures it.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_modelopt import evaluate_model, load_recipe

    folder, loaded = wide_tiny_models("bert"), load_recipe(recipe)
    expected = evaluate_model(AutoModelForSequenceClassification.from_pretrained(folder),
                              AutoTokenizer.from_pretrained(folder), loaded.data, task=loaded.task)
    assert rows["fp32"]["accuracy"] == rows["fp32 +compile"]["accuracy"] == expected["accuracy"]
    assert "| compressed-tensors-int8 |" in (out / "bench.md").read_text()
