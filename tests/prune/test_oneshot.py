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


def test_prune_oneshot_stage_calibrates_any_task_compat_allows(tiny_models, sst2_files, tmp_path):
    """compat allows one-shot pruning of a classifier (one stack of blocks): the stage calibrates on the rows its
    task prepares (a seq2seq recipe is refused before any stage runs: tests/tasks/test_seq2seq.py)."""
    from transformers import AutoModelForSequenceClassification

    stages = [{"type": "prune_oneshot", "method": "wanda", "sparsity": 0.5, "calibration_samples": 4}]
    run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)), tmp_path / "out")
    pruned = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "stages" / "prune_oneshot" / "model")
    assert abs(sparsity_of(prunable_linears(pruned)) - 0.5) < 0.01
    with pytest.raises(RecipeError, match="N:M needs"):
        validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=[{"type": "prune_oneshot",
                                                                              "pattern": "4:2"}]))


# Models whose blocks differ (`layer_types`): sliding-window vs full attention, and for gemma3 a rotary embedding
# per attention type. A sliding window of 4 over 16 tokens makes the two masks differ.
MIXED_ATTENTION = {
    "gemma2": ("AutoModelForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            sliding_window=4)),
    "gemma3_text": ("AutoModelForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                 sliding_window=4, layer_types=["sliding_attention",
                                                                                "full_attention",
                                                                                "sliding_attention"])),
    "modernbert": ("AutoModelForMaskedLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                num_attention_heads=4, local_attention=4, pad_token_id=0,
                                                bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
}


def _mixed_attention_model(model_type):
    import transformers

    auto_class, kwargs = MIXED_ATTENTION[model_type]
    config = transformers.AutoConfig.for_model(model_type, vocab_size=128, **kwargs)
    torch.manual_seed(0)
    return getattr(transformers, auto_class).from_config(config).eval()


@torch.no_grad()
def _reference_wanda_masks(model, batches, sparsity):
    """Wanda block by block, each block's Linear inputs captured by hooks in full forward passes of the model
    (blocks before it already pruned): the model passes each block its own mask and rotary embeddings."""
    from hf_modelopt.distill.student import transformer_layers

    prefix, layers = transformer_layers(model)
    masks = {}
    for index in range(len(layers)):
        mine = {n: m for n, m in prunable_linears(model).items() if n.startswith(f"{prefix}.{index}.")}
        sums = {n: torch.zeros(m.in_features) for n, m in mine.items()}
        counts = dict.fromkeys(mine, 0)

        def hook(name, sums=sums, counts=counts):
            def record(module, args, output):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] += (x * x).sum(0)
                counts[name] += x.shape[0]
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in mine.items()]
        for batch in batches:
            model(**batch)
        for handle in handles:
            handle.remove()
        for name, module in mine.items():
            score = module.weight.abs() * torch.sqrt(sums[name] / counts[name]).unsqueeze(0)
            drop = torch.argsort(score, dim=1)[:, : int(score.shape[1] * sparsity)]
            keep = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
            module.weight.mul_(keep)
            masks[name] = keep
    return masks


@pytest.mark.parametrize("model_type", list(MIXED_ATTENTION))
def test_oneshot_calibrates_each_block_with_its_own_inputs(model_type):
    from hf_modelopt.distill.student import transformer_layers

    model = _mixed_attention_model(model_type)
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 128, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
               for _ in range(2)]
    # The test means something only if the blocks get different arguments (mask or rotary embeddings).
    seen = []
    _, layers = transformer_layers(model)
    handles = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True) for layer in layers]
    model(**batches[0])
    for handle in handles:
        handle.remove()
    def tensors(kwargs):
        values = [kwargs.get("attention_mask"), *(kwargs.get("position_embeddings") or ())]
        return [v for v in values if isinstance(v, torch.Tensor)]

    differs = any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(tensors(seen[0]), tensors(seen[1])))
    assert differs, "blocks 0 and 1 get the same arguments: this model does not exercise per-block calibration"

    reference = _mixed_attention_model(model_type)
    expected = _reference_wanda_masks(reference, batches, 0.5)
    prune_oneshot_(model, batches, "wanda", 0.5, progress=False)
    modules = prunable_linears(model)
    for name, keep in expected.items():
        assert torch.equal(modules[name].weight != 0, keep), name
