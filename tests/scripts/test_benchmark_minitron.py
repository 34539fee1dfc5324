import json
import subprocess
import sys

import yaml

from ..conftest import REPO, tiny_recipe

# The tiny Llama has 1,972,000 parameters, 1,953,408 of them its untied embeddings and LM head (vocab 30522 x 32).
BUDGET = 1_965_000


def test_four_shapes_within_the_budget_are_measured_against_the_teacher(tiny_models, sst2_files, tmp_path):
    stage = {"type": "minitron", "target_params": BUDGET, "search_candidates": 3, "calibration_batches": 2,
             "calibration_batch_size": 4}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_models("llama", "causal-lm"), sst2_files, task="causal-lm",
                                                 stages=[{"type": "evaluate"}, stage])))
    command = [sys.executable, "scripts/benchmark_minitron.py", str(recipe), "--heads", "2", "--hidden", "24",
               "--output-dir", str(tmp_path / "b")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "b" / "minitron.json").read_text())
    teacher, depth, width, hidden, best = result["rows"]
    assert teacher["parameters"] == 1_972_000 and all(row["parameters"] <= BUDGET for row in result["rows"][1:])
    assert depth["shape"]["num_hidden_layers"] == 1 and depth["shape"]["hidden_size"] == 32
    assert width["shape"]["num_attention_heads"] == 2 and width["shape"]["hidden_size"] == 32
    assert hidden["shape"]["hidden_size"] == 24
    assert len(result["search"]) == 3
    assert best["calibration_lm_loss"] == min(row["lm_loss"] for row in result["search"])
    assert (tmp_path / "b" / "minitron.md").read_text().count("\n|") >= 6
