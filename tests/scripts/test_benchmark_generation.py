import json
import subprocess
import sys

import yaml

from ..conftest import REPO, tiny_recipe


def test_throughput_of_both_models_at_each_batch_size(tiny_models, sst2_files, tmp_path):
    model = tiny_models("llama", "causal-lm")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(model, sst2_files, task="causal-lm", stages=[{"type": "evaluate"}])))
    command = [sys.executable, "scripts/benchmark_generation.py", str(recipe), str(model), "--batch-sizes", "1", "3",
               "--new-tokens", "5", "--prompt-tokens", "6", "--repeats", "2", "--output-dir", str(tmp_path / "g")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert [row["batch_size"] for row in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert len(row["model_all_seconds"]) == len(row["baseline_all_seconds"]) == 2
        assert row["model_tokens_per_second"] == row["batch_size"] * 5 / row["model_seconds"]
        assert row["speedup"] == row["model_tokens_per_second"] / row["baseline_tokens_per_second"]
    assert (tmp_path / "g" / "generation.md").read_text().count("\n| ") == 3
