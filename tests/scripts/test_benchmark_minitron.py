import json
import subprocess
import sys

import pytest
import yaml

from ..conftest import REPO, tiny_recipe

# The tiny Llama has 1,972,000 parameters, 1,953,408 of them its untied embeddings and LM head (vocab 30522 x 32).
BUDGET = 1_965_000


def test_four_shapes_within_the_budget_are_measured_against_the_teacher(tiny_models, sst2_files, tmp_path):
    stage = {"type": "minitron", "target_params": BUDGET, "search_candidates": 3, "calibration_batches": 2,
             "calibration_batch_size": 4, "distillation": {"top_k": 8, "temperature": 1.0},
             "training": {"learning_rate": 1e-3}}
    model = tiny_models("llama", "causal-lm")
    recipe, distill_recipe = tmp_path / "tiny.yaml", tmp_path / "tiny-distill.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(model, sst2_files, task="causal-lm",
                                                 stages=[{"type": "evaluate"}, stage])))
    distill_recipe.write_text(yaml.safe_dump(tiny_recipe(model, sst2_files, task="causal-lm", stages=[
        {"type": "distill", "student": {"layers": [1]}, "ce_weight": 0.5}])))
    command = [sys.executable, "scripts/benchmark_minitron.py", str(recipe), "--heads", "2", "--hidden", "24",
               "--output-dir", str(tmp_path / "b"), "--kd-steps", "3", "--curve-every", "2",
               "--distill-recipe", str(distill_recipe)]
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

    # Then every shape, the best by CE alone and the distill recipe's student, trained on the same tokens.
    kd = json.loads((tmp_path / "b" / "minitron-kd.json").read_text())
    names = [row["name"] for row in kd["rows"]]
    references = [f"{best['name']}, CE only", "tiny-distill.yaml student"]
    assert names == [row["name"] for row in result["rows"][1:]] + references
    tokens = 3 * 8 * 32  # steps x batch x block length of the tiny recipe
    for row, shape_row in zip(kd["rows"], result["rows"][1:]):
        assert row["parameters"] == shape_row["parameters"] and row["kd_tokens"] == tokens
        # Before training, the curve's first point is the pruned model measured above.
        assert row["perplexity_before"] == pytest.approx(shape_row["perplexity"], rel=1e-5)
        assert [p["step"] for p in row["curve"]] == [0, 2, 3] and row["perplexity_after"] != row["perplexity_before"]
    assert [row["loss"] for row in kd["rows"][-2:]] == ["1.0 CE", "1.0 KD + 0.5 CE"]
    assert {row["loss"] for row in kd["rows"][:-2]} == {"1.0 KD, top-8"}
    assert kd["rows"][-1]["shape"]["num_hidden_layers"] == 1 and kd["rows"][-1]["kd_tokens"] == tokens
    assert (tmp_path / "b" / "minitron-kd.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "b" / "minitron-kd.md").read_text().count("\n|") >= 2 + 6 + 2 + 3
