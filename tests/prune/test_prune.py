"""`prune_(model, config, batches)`: one verb, the technique chosen by the config's type."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hf_modelopt import OneShotPruningConfig, PruningConfig, StructuredPruningConfig, prune_
from hf_modelopt.prune.masks import prunable_linears, sparsity_of


def batches_for(folder, causal=False, count=3):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["a fine film", "dull and slow , a mess", "the best of the year", "not good at all"]
    out = []
    for i in range(count):
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        batch["labels"] = batch["input_ids"].clone() if causal else torch.tensor([1, 0, 1, (i % 2)])
        out.append(batch)
    return out


def test_structured_config_removes_heads_and_neurons_and_keeps_the_output_of_the_kept_ones(tiny_models):
    folder = tiny_models("bert")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    report = prune_(model, StructuredPruningConfig(heads=0.5, neurons=0.5), batches=batches_for(folder))
    assert [len(kept) for kept in report["kept_heads"]] == [1, 1]
    assert [len(kept) for kept in report["kept_neurons"]] == [32, 32]
    assert model.config.intermediate_size == 32
    assert report["parameters_after"] == sum(p.numel() for p in model.parameters()) < report["parameters_before"]
    assert model.bert.encoder.layer[0].attention.self.query.weight.shape == (16, 32)


def test_structured_gradient_importance_needs_batches_and_magnitude_does_not(tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    with pytest.raises(ValueError, match="pass batches="):
        prune_(model, StructuredPruningConfig(neurons=0.5))
    report = prune_(model, StructuredPruningConfig(neurons=0.25, importance="magnitude"))
    assert model.config.intermediate_size == 48 and report["importance"] == "magnitude"


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_one_shot_config_prunes_a_causal_lm_to_the_sparsity(tiny_models, method):
    folder = tiny_models("llama", "causal-lm")
    model = AutoModelForCausalLM.from_pretrained(folder)
    report = prune_(model, OneShotPruningConfig(method=method, sparsity=0.5), batches_for(folder, causal=True))
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert sparsity_of(prunable_linears(model)) == pytest.approx(report["sparsity"])


def test_one_shot_2_of_4_pattern_holds_in_every_group(tiny_models):
    folder = tiny_models("llama", "causal-lm")
    model = AutoModelForCausalLM.from_pretrained(folder)
    prune_(model, OneShotPruningConfig(method="wanda", pattern="2:4"), batches_for(folder, causal=True))
    weight = model.model.layers[0].mlp.down_proj.weight
    assert ((weight.view(weight.shape[0], -1, 4) == 0).sum(-1) >= 2).all()


def test_pruning_config_at_once_is_magnitude_to_the_final_sparsity(tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    threshold = weight.detach().abs().flatten().kthvalue(int(0.8 * weight.numel())).values
    report = prune_(model, PruningConfig(sparsity=0.8))
    assert report["sparsity"] == pytest.approx(0.8, abs=1e-3)
    kept = weight.detach() != 0
    assert (weight.detach()[kept].abs() >= threshold).all()  # the smallest magnitudes went


def test_movement_needs_training_and_other_types_are_refused(tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    with pytest.raises(ValueError, match="PruningCallback"):
        prune_(model, PruningConfig(sparsity=0.5, method="movement"))
    with pytest.raises(TypeError, match="StructuredPruningConfig"):
        prune_(model, {"sparsity": 0.5})
