"""The `prune_experts` recipe stage: whole experts removed from every MoE block, a plain config that loads with
`from_pretrained`, bad counts refused before any stage runs."""

import json

import pytest
import torch
import transformers

from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import RecipeError, validate_recipe

from ..conftest import minilm_folder, tiny_recipe
from ..prune.test_experts import MOE_CONFIGS


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny Qwen3-MoE causal LM (4 experts, 2 per token) with the MiniLM tokenizer, saved."""
    folder = tmp_path_factory.mktemp("qwen3_moe")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    config = transformers.AutoConfig.for_model("qwen3_moe", **MOE_CONFIGS["qwen3_moe"],
                                               vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_stage_keeps_half_the_experts_and_the_export_loads_plainly(tiny_moe, sst2_files, tmp_path):
    stages = [{"type": "evaluate", "name": "before"},
              {"type": "prune_experts", "experts": 2, "calibration_batches": 2},
              {"type": "evaluate", "name": "after"}, {"type": "export"}]
    out = tmp_path / "out"
    result = run_recipe(validate_recipe(tiny_recipe(tiny_moe, sst2_files, task="causal-lm", stages=stages)), out)

    record = next(r for r in result["stages"] if r["type"] == "prune_experts")
    report = json.loads((out / "stages" / record["name"] / "experts.json").read_text())
    assert record["metrics"]["experts"] == 2
    assert record["metrics"]["parameters"] == report["parameters_after"] < report["parameters_before"]
    assert len(report["kept_experts"]) == 2 and all(len(kept) == 2 for kept in report["kept_experts"].values())
    # The export is a plain Qwen3-MoE with 2 experts, checked by the export's own fresh-process reload.
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 2 and model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2
    assert json.loads((out / "export.json").read_text())["reload_check"]["passed"]
    assert record["metrics"]["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("experts,message", [(4, "keep 4 experts per block: it must be at least the 2 chosen per "
                                                 "token and fewer than the 4 there are"),
                                             (1, "keep 1 experts per block")])
def test_a_count_the_model_cannot_keep_is_refused_before_any_stage(tiny_moe, sst2_files, tmp_path, experts, message):
    stages = [{"type": "evaluate"}, {"type": "prune_experts", "experts": experts}]
    recipe = tiny_recipe(tiny_moe, sst2_files, task="causal-lm", stages=stages)
    with pytest.raises(RecipeError, match=f"prune_experts.experts: {message}") as refused:
        run_recipe(validate_recipe(recipe), tmp_path / "out")
    assert "\n" not in str(refused.value) and not (tmp_path / "out" / "stages").exists()


def test_a_dense_model_is_refused_before_any_stage(tiny_models, sst2_files, tmp_path):
    stages = [{"type": "evaluate"}, {"type": "prune_experts", "experts": 2}]
    recipe = tiny_recipe(tiny_models("llama", "causal-lm"), sst2_files, task="causal-lm", stages=stages)
    with pytest.raises(RecipeError, match="LlamaForCausalLM has no mixture-of-experts blocks"):
        run_recipe(validate_recipe(recipe), tmp_path / "out")
    assert not (tmp_path / "out" / "stages").exists()
