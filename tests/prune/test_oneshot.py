import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_modelopt.pipeline import run_recipe
from hf_modelopt.prune.masks import prunable_linears, sparsity_of
from hf_modelopt.prune.oneshot import magnitude_mask, prune_oneshot_, sparsegpt_prune_, wanda_mask
from hf_modelopt.recipe import RecipeError, validate_recipe
from tests.conftest import tiny_recipe


def test_wanda_keeps_weights_on_loud_inputs():
    weight = torch.ones(2, 4)
    norms = torch.tensor([10.0, 0.1, 5.0, 0.2])
    assert wanda_mask(weight, norms, 0.5).tolist() == [[True, False, True, False]] * 2
    assert magnitude_mask(torch.tensor([[1.0, -4.0, 3.0, 2.0]]), 0.5, nm=(2, 4)).tolist() == [[False, True, True,
                                                                                                  False]]


def test_sparsegpt_compensates_better_than_dropping():
    torch.manual_seed(0)
    x = torch.randn(256, 16) @ torch.randn(16, 16)  # correlated inputs: compensation can help
    weight = torch.randn(8, 16)
    pruned = weight.clone()
    sparsegpt_prune_(pruned, x.T @ x, 0.5, block_size=8)
    masked = weight * (pruned != 0)
    assert abs(float((pruned == 0).float().mean()) - 0.5) < 0.05
    assert ((x @ pruned.T - x @ weight.T) ** 2).mean() < ((x @ masked.T - x @ weight.T) ** 2).mean()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("method,pattern", [("wanda", "2:4"), ("sparsegpt", "unstructured"), ("magnitude", "2:4")])
def test_oneshot_reaches_the_pattern(tiny_models, model_type, method, pattern):
    model = AutoModelForCausalLM.from_pretrained(tiny_models(model_type, "causal-lm"))
    batches = [{"input_ids": torch.randint(5, 1000, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long)}]
    prune_oneshot_(model, batches, method, 0.5, pattern, progress=False)
    modules = prunable_linears(model)
    assert abs(sparsity_of(modules) - 0.5) < 0.01
    if pattern == "2:4":
        from hf_modelopt.prune.masks import linear_weight

        for module in modules.values():
            groups = (linear_weight(module) != 0).reshape(-1, 4).sum(-1)
            assert (groups <= 2).all()


def test_prune_oneshot_stage_exports_sparse_checkpoint_that_reloads_exactly(tiny_models, sst2_files, tmp_path):
    stages = [{"type": "prune_oneshot", "method": "wanda", "sparsity": 0.6, "calibration_samples": 4},
              {"type": "evaluate"}]
    recipe = tiny_recipe(tiny_models("llama", "causal-lm"), sst2_files, task="causal-lm", stages=stages)
    result = run_recipe(validate_recipe(recipe), tmp_path / "out")
    stage = tmp_path / "out" / "stages" / "prune_oneshot"
    record = next(r for r in result["stages"] if r["type"] == "prune_oneshot")
    assert record["metrics"]["sparse_mb"] < record["metrics"]["dense_mb"]
    dense = AutoModelForCausalLM.from_pretrained(stage / "model")
    sparse = AutoModelForCausalLM.from_pretrained(stage / "sparse")
    for (name, a), b in zip(dense.state_dict().items(), sparse.state_dict().values()):
        assert torch.equal(a, b), name
    assert abs(sparsity_of(prunable_linears(sparse)) - 0.6) < 0.01


def test_prune_oneshot_is_for_causal_lms(tiny_models, sst2_files, tmp_path):
    recipe = tiny_recipe(tiny_models("bert"), sst2_files, stages=[{"type": "prune_oneshot"}])
    with pytest.raises(RecipeError, match="for causal LMs"):
        run_recipe(validate_recipe(recipe), tmp_path / "out")
    with pytest.raises(RecipeError, match="N:M needs"):
        validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=[{"type": "prune_oneshot",
                                                                              "pattern": "4:2"}]))
