"""The `minitron` recipe stage on a tiny Llama through the real pipeline: prune to a budget, recover by KD from the
unpruned model, export a plain model that a fresh process loads without hf-modelopt; bad settings refused first."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_modelopt.errors import UserError
from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import RecipeError, validate_recipe
from tests.conftest import tiny_recipe

# The tiny Llama's blocks and final norm: 2 x 9,280 + 32 = 18,592 non-embedding parameters; this budget needs a
# narrower or shallower shape, found by the search.
NON_EMBEDDING_BUDGET = 12_000


def minitron_stage(**overrides) -> dict:
    return {"type": "minitron", "target_params": NON_EMBEDDING_BUDGET, "target_params_counted": "non_embedding",
            "search_candidates": 3, "calibration_batches": 2, "calibration_batch_size": 4, **overrides}


def test_minitron_stage_prunes_recovers_by_kd_and_exports_a_plain_model(tiny_models, sst2_files, tmp_path):
    kd = {"kd_weight": 1.0, "temperature": 1.0, "top_k": 16, "cache_teacher_logits": True}
    stages = [{"type": "evaluate", "name": "teacher"},
              minitron_stage(distillation=kd, training={"max_steps": 2}, perplexity_every_steps=1),
              {"type": "evaluate", "name": "student"}]
    out = tmp_path / "out"
    result = run_recipe(validate_recipe(tiny_recipe(tiny_models("llama", "causal-lm"), sst2_files, task="causal-lm",
                                                    stages=stages)), out)

    record = next(r for r in result["stages"] if r["type"] == "minitron")
    report = json.loads((out / "stages" / "minitron" / "minitron.json").read_text())
    assert record["metrics"]["parameters"] == report["parameters_after"] < report["parameters_before"]
    curve = report["recovery"].pop("perplexity_curve")
    assert len(report["search"]) == 3 and report["recovery"] == {"steps": 2, "tokens": 2 * 8 * 32}
    # The curve: before KD, then every step; its last point is the trained student the next stage evaluates.
    assert [(p["step"], p["tokens_trained"]) for p in curve] == [(0, 0), (1, 8 * 32), (2, 2 * 8 * 32)]
    student = next(r for r in result["stages"] if r["name"] == "student")["metrics"]
    assert curve[-1]["held_out_perplexity"] == pytest.approx(student["perplexity"], rel=1e-5)
    assert curve[0]["held_out_perplexity"] != pytest.approx(curve[-1]["held_out_perplexity"], rel=1e-5)
    assert (out / "plots" / "minitron-perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert record["metrics"]["kd_tokens"] == 2 * 8 * 32
    chosen = min(report["search"], key=lambda row: row["lm_loss"])
    assert chosen["parameters"] <= NON_EMBEDDING_BUDGET
    assert {key: chosen[key] for key in report["shape_after"]} == report["shape_after"]
    assert (out / "stages" / "minitron" / "teacher_logits.safetensors").is_file()  # KD read the top-k cache
    card = (out / "README.md").read_text()
    assert "## Stage `minitron` (minitron)" in card and "Shape search" in card
    assert "Held-out perplexity against KD tokens: 0: " in card and "](plots/minitron-perplexity.png)" in card

    # A fresh process that never imports hf_modelopt builds the plain config and computes the same logits.
    ids = [[5, 17, 29, 3, 11, 7]]
    script = textwrap.dedent(f"""
        import json, sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        assert "hf_modelopt" not in sys.modules
        with torch.no_grad():
            logits = model(torch.tensor({ids})).logits
        config = model.config.to_dict()
        print(json.dumps({{"class": type(model).__name__, "config": config, "logits": logits.tolist()}}))
    """)
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                       check=True).stdout)
    assert loaded["class"] == "LlamaForCausalLM"
    assert {key: loaded["config"][key] for key in report["shape_after"]} == report["shape_after"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(loaded["logits"]), model(torch.tensor(ids)).logits, atol=1e-5, rtol=0)


def test_minitron_stage_without_kd_prunes_to_an_explicit_shape(tiny_models, sst2_files, tmp_path):
    stage = {"type": "minitron", "num_hidden_layers": 1, "hidden_size": 24, "intermediate_size": 32,
             "calibration_batches": 1}
    recipe = tiny_recipe(tiny_models("llama", "causal-lm"), sst2_files, task="causal-lm", stages=[stage],
                         verify_export=False)
    result = run_recipe(validate_recipe(recipe), tmp_path / "out")
    metrics = next(r for r in result["stages"] if r["type"] == "minitron")["metrics"]
    assert (metrics["num_hidden_layers"], metrics["hidden_size"], metrics["intermediate_size"]) == (1, 24, 32)
    assert "kd_tokens" not in metrics
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "out").config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (1, 24, 32)


@pytest.mark.parametrize("model_type,task,stage,message", [
    ("bert", "text-classification", minitron_stage(), "Minitron pruning is for causal LMs"),
    ("llama", "causal-lm", minitron_stage(target_params=10**9, target_params_counted="total"),
     "target_params=1000000000 is not below the model's"),
    ("llama", "causal-lm", {"type": "minitron", "hidden_size": 64}, "hidden_size=64 is larger than the model's 32"),
    ("llama", "causal-lm", minitron_stage(num_hidden_layers=4), "num_hidden_layers=4 is larger than the model's"),
    ("gpt2", "causal-lm", minitron_stage(), "does not support model_type 'gpt2'"),
    ("llama", "causal-lm", minitron_stage(perplexity_every_steps=5), "measures the KD recovery: set distillation"),
])
def test_unsupported_minitron_settings_are_refused_in_one_line_before_any_work(tiny_models, sst2_files, tmp_path,
                                                                               model_type, task, stage, message):
    recipe = tiny_recipe(tiny_models(model_type, task), sst2_files, task=task,
                         stages=[{"type": "evaluate"}, stage])
    with pytest.raises(RecipeError, match=message) as refused:
        run_recipe(validate_recipe(recipe), tmp_path / "out")
    assert "\n" not in str(refused.value) and "minitron" in str(refused.value)
    assert not (tmp_path / "out" / "stages").exists()  # refused before the first stage


def test_after_a_stage_that_changes_the_model_the_stage_checks_the_model_it_gets(tiny_models, sst2_files, tmp_path):
    # The distilled student has 1 block: a shape of 2 blocks is only known to be out of reach when the stage runs,
    # and is refused there, before it scores or prunes anything.
    stages = [{"type": "distill", "student": {"layers": [0]}, "training": {"max_steps": 1}},
              {"type": "minitron", "num_hidden_layers": 2, "hidden_size": 16}]
    recipe = tiny_recipe(tiny_models("llama", "causal-lm"), sst2_files, task="causal-lm", stages=stages)
    with pytest.raises(UserError, match="num_hidden_layers=2 is larger than the model's 1"):
        run_recipe(validate_recipe(recipe), tmp_path / "out")
    assert not (tmp_path / "out" / "stages" / "minitron" / "minitron.json").exists()
