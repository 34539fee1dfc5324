"""Minitron width / depth pruning of decoder LLMs (`MinitronConfig`): on tiny random models of every supported
family, removing blocks, heads, FFN neurons or embedding channels computes exactly what zeroing (or skipping)
them computes, and the pruned model is a plain config that loads without hf-modelopt."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers

from hf_modelopt import prune_
from hf_modelopt.compat import UnsupportedModelError
from hf_modelopt.errors import UserError
from hf_modelopt.prune.minitron import (
    DECODER_LAYOUTS,
    MinitronConfig,
    activation_importance,
    calibration_lm_loss,
    candidate_shapes,
    current_shape,
    parameters_of,
    remove_blocks_,
    skipped_block,
)
from hf_modelopt.prune.structured import head_geometry, parameter_count

VOCAB = 64
# Larger than transformers' default init (0.02), so that every removed unit visibly changes the logits and the
# "same logits as masking" checks below could fail.
INIT = 0.2
GQA = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, intermediate_size=48,
           initializer_range=INIT, vocab_size=VOCAB)
# model_type -> a tiny config: grouped-query attention (4 query heads per key/value head); Llama with tied
# embeddings (as SmolLM2), Qwen2 with its head size derived from hidden_size / num_attention_heads.
FAMILIES = {
    "llama": dict(GQA, head_dim=4, tie_word_embeddings=True),
    "mistral": dict(GQA, head_dim=4),
    "qwen2": dict(GQA),
    "qwen3": dict(GQA, head_dim=4),
}
# One key/value head per query head: heads go with their keys and values.
MHA = dict(GQA, num_attention_heads=4, num_key_value_heads=4, head_dim=8)


def tiny_lm(model_type: str, **overrides):
    config = transformers.AutoConfig.for_model(model_type, **{**FAMILIES.get(model_type, MHA), **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def calibration_batches(count: int = 2):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, 7:] = 0  # a padded row: its padding is not scored
        batches.append({"input_ids": torch.randint(0, VOCAB, (2, 10), generator=generator), "attention_mask": mask})
    return batches


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def assert_same_logits(pruned, masked, original, batch):
    difference = (logits(pruned, batch) - logits(masked, batch)).abs().max().item()
    assert difference < 1e-5, f"pruned and masked logits differ by {difference}"
    # the check can fail: what was removed mattered
    assert (logits(original, batch) - logits(masked, batch)).abs().max().item() > 1e-3
    return difference


def test_supported_families_are_the_tested_ones():
    assert set(DECODER_LAYOUTS) == set(FAMILIES)


# --------------------------------------------------------------------------- importance


def test_importance_measures_what_it_says():
    model = tiny_lm("llama")
    layers = model.model.layers
    with torch.no_grad():
        layers[0].mlp.up_proj.weight[5] = 0  # neuron 5 of block 0 never fires
        layers[1].self_attn.v_proj.weight[:4] = 0  # block 1's first key/value group outputs nothing
        for norm in [model.model.norm] + [n for layer in layers for n in (layer.input_layernorm,
                                                                          layer.post_attention_layernorm)]:
            norm.weight[3] = 0  # channel 3 is zero after every norm
        layers[2].self_attn.o_proj.weight.zero_()  # block 2 leaves its input unchanged
        layers[2].mlp.down_proj.weight.zero_()
    importance = activation_importance(model, calibration_batches())
    assert importance.neurons[0][5] == 0 and (importance.neurons[0] > 0).sum() == 47
    assert importance.kv_groups[1][0] == 0 and importance.kv_groups[1][1] > 0
    assert (importance.heads[1][:4] == 0).all()
    assert importance.hidden[3] == 0 and (importance.hidden > 0).sum() == 31
    assert importance.block_influence[2].abs() < 1e-6 and importance.block_influence[:2].min() > 0
    assert importance.lm_loss_without_layer[2] == pytest.approx(importance.lm_loss, abs=1e-6)
    assert importance.tokens == 2 * (10 + 7)  # padding not scored
    table = importance.table()
    assert len(table.splitlines()) == 2 + 3 and "block infl." in table


def test_loss_with_a_block_skipped_is_the_loss_of_the_model_without_it():
    model, batches = tiny_lm("qwen3"), calibration_batches()
    importance = activation_importance(model, batches)
    with skipped_block(model, 1):
        assert calibration_lm_loss(model, batches)[0] == pytest.approx(importance.lm_loss_without_layer[1].item())
    assert calibration_lm_loss(model, batches)[0] == pytest.approx(importance.lm_loss)  # the block is back


# --------------------------------------------------------------------------- masking == removal


def mask_heads_and_neurons_(model, plan) -> None:
    """Zero the output projection's columns of every query head and FFN neuron the plan drops (all blocks kept)."""
    heads, _, head_dim = head_geometry(model.config)
    with torch.no_grad():
        for layer, kept_heads, kept_neurons in zip(model.model.layers, plan.kept_heads, plan.kept_neurons):
            for head in set(range(heads)) - set(kept_heads):
                layer.self_attn.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
            dropped = sorted(set(range(model.config.intermediate_size)) - set(kept_neurons))
            layer.mlp.down_proj.weight[:, dropped] = 0


@pytest.mark.parametrize("model_type", [*FAMILIES, "llama-mha"])
def test_width_removal_equals_masking(model_type):
    mha = model_type == "llama-mha"
    original, batches = tiny_lm("llama" if mha else model_type), calibration_batches()
    if mha:
        original = tiny_lm("llama", **MHA)
    shape = dict(num_attention_heads=2, intermediate_size=20)
    if not mha:
        shape["num_key_value_heads"] = 1  # one of two groups goes, and 2 of the 4 query heads of the other
    pruned = copy.deepcopy(original)
    report = prune_(pruned, MinitronConfig(**shape), batches)
    assert report["shape_after"] == {**report["shape_before"], **shape, "num_key_value_heads": 2 if mha else 1}
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape[0] == 2 * head_geometry(original.config)[2]
    masked = copy.deepcopy(original)
    mask_heads_and_neurons_(masked, report["plan"])
    for batch in batches:
        assert_same_logits(pruned, masked, original, batch)


def mask_hidden_channels_(model, kept: list[int]) -> None:
    """Zero the dropped channels of the residual stream: in the embeddings, in every norm's weight, and in the
    output rows of the projections writing to it (so they stay zero all the way)."""
    dropped = sorted(set(range(model.config.hidden_size)) - set(kept))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dropped] = 0
        model.model.norm.weight[dropped] = 0
        for layer in model.model.layers:
            for module in (layer.input_layernorm, layer.post_attention_layernorm):
                module.weight[dropped] = 0
            layer.self_attn.o_proj.weight[dropped] = 0
            layer.mlp.down_proj.weight[dropped] = 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_hidden_size_removal_equals_masking(model_type):
    # The pruned RMSNorms average over fewer channels and are rescaled to match (see remove_hidden_channels_):
    # exact up to epsilon, which is therefore made negligible here (at the default 1e-6 the logits differ by
    # about 1e-4). In float64, though the norms still compute in float32: that leaves ~3e-6 on logits of ~5.
    original, batches = tiny_lm(model_type, rms_norm_eps=1e-12).to(torch.float64), calibration_batches()
    pruned = copy.deepcopy(original)
    report = prune_(pruned, MinitronConfig(hidden_size=20), batches)
    assert pruned.config.hidden_size == 20 and pruned.lm_head.weight.shape == (VOCAB, 20)
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == original.config.tie_word_embeddings
    masked = copy.deepcopy(original)
    mask_hidden_channels_(masked, report["plan"].kept_hidden)
    for batch in batches:
        assert_same_logits(pruned, masked, original, batch)


def skip_with_hooks(model, dropped: list[int]):
    """Each dropped block returns its input (its output replaced by a forward hook)."""
    def hook(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    return [model.model.layers[i].register_forward_hook(hook, with_kwargs=True) for i in dropped]


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("depth_importance", ["lm_loss", "block_influence"])
def test_depth_removal_equals_skipping(model_type, depth_importance):
    original, batches = tiny_lm(model_type, num_hidden_layers=4), calibration_batches()
    pruned = copy.deepcopy(original)
    report = prune_(pruned, MinitronConfig(num_hidden_layers=2, depth_importance=depth_importance), batches)
    importance = report["importance"].layer_importance(depth_importance)
    assert sorted(report["plan"].kept_layers) == sorted(torch.topk(importance, 2).indices.tolist())
    assert len(pruned.model.layers) == pruned.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]  # the cache slots
    if getattr(original.config, "layer_types", None) is not None:
        assert len(pruned.config.layer_types) == 2
    masked = copy.deepcopy(original)
    skip_with_hooks(masked, report["dropped_layers"])
    for batch in batches:
        assert_same_logits(pruned, masked, original, batch)
    # generation with the KV cache uses the renumbered slots
    prompt = batches[0]["input_ids"][:1, :4]
    generated = pruned.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, masked.generate(prompt, max_new_tokens=4, do_sample=False))


# --------------------------------------------------------------------------- a plain model on disk


LOAD_WITHOUT_HF_MODELOPT = textwrap.dedent("""
    import sys
    import torch
    import transformers
    folder, inputs, out = sys.argv[1:]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**torch.load(inputs)).logits
    torch.save({"logits": logits, "class": type(model).__name__}, out)
    assert "hf_modelopt" not in sys.modules
""")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_pruned_model_loads_with_plain_from_pretrained(model_type, tmp_path):
    model, batches = tiny_lm(model_type, num_hidden_layers=4), calibration_batches()
    shape = dict(num_hidden_layers=3, hidden_size=24, intermediate_size=32, num_attention_heads=4,
                 num_key_value_heads=1)
    report = prune_(model, MinitronConfig(**shape), batches)
    assert report["shape_after"] == shape and report["parameters_after"] < report["parameters_before"]
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "quantization_config" not in saved and {k: saved[k] for k in shape} == shape
    assert saved["head_dim"] == 4
    torch.save(batches[0], tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_HF_MODELOPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "inputs.pt"),
                    str(tmp_path / "out.pt")], check=True, capture_output=True, text=True)
    loaded = torch.load(tmp_path / "out.pt")
    assert loaded["class"] == type(model).__name__
    assert (loaded["logits"] - logits(model, batches[0])).abs().max().item() < 1e-5


# --------------------------------------------------------------------------- refusals


def state(model) -> tuple[dict, dict]:
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def assert_unchanged(model, before):
    weights, config = state(model)
    assert config == before[1] and weights.keys() == before[0].keys()
    assert all(torch.equal(weights[k], before[0][k]) for k in weights)


@pytest.mark.parametrize("build, message", [
    (lambda: transformers.AutoModelForMaskedLM.from_config(transformers.AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
     "model_type 'bert'"),
    (lambda: transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "gemma", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64)), r"sqrt\(hidden_size\)"),
    (lambda: transformers.AutoModel.from_config(tiny_lm("llama").config), "has none"),
])
def test_unsupported_models_are_refused_unchanged(build, message):
    model = build()
    before = state(model)
    with pytest.raises(UnsupportedModelError, match=message) as raised:
        prune_(model, MinitronConfig(intermediate_size=16), calibration_batches())
    assert "\n" not in str(raised.value) and "supported: llama, mistral, qwen2, qwen3" in str(raised.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("shape, message", [
    (dict(hidden_size=64), "hidden_size=64 is larger than the model's 32"),
    (dict(num_hidden_layers=4), "num_hidden_layers=4 is larger than the model's 3"),
    (dict(num_attention_heads=3), "must be a multiple of num_key_value_heads=2"),
    (dict(num_attention_heads=8, num_key_value_heads=1), "at most 4 query heads per key/value head"),
])
def test_shapes_pruning_cannot_reach_are_refused_unchanged(shape, message):
    model = tiny_lm("qwen3")
    before = state(model)
    with pytest.raises(UserError, match=message) as raised:
        prune_(model, MinitronConfig(**shape), calibration_batches())
    assert "\n" not in str(raised.value)
    assert_unchanged(model, before)


def test_fewer_than_one_layer_or_no_target_or_no_batches_is_refused():
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        MinitronConfig(num_hidden_layers=0)
    with pytest.raises(ValueError, match="set target_params, or at least one target shape field"):
        MinitronConfig()
    model = tiny_lm("llama")
    before = state(model)
    with pytest.raises(UserError, match="pass batches="):
        prune_(model, MinitronConfig(hidden_size=16), None)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- the budget search


@pytest.mark.parametrize("model_type", FAMILIES)
def test_parameter_count_of_a_shape_is_that_of_the_pruned_model(model_type):
    # (qwen2: biased q/k/v; qwen3: per-head q/k norms; llama: tied embeddings)
    model, batches = tiny_lm(model_type, num_hidden_layers=4), calibration_batches(1)
    count = parameters_of(model, "total")
    assert count(current_shape(model)) == parameter_count(model)
    for shape in candidate_shapes(model)[::40]:
        pruned = copy.deepcopy(model)
        prune_(pruned, MinitronConfig(**shape), batches)
        assert parameter_count(pruned) == count(shape), shape


@pytest.mark.parametrize("counted", ["total", "non_embedding"])
def test_search_takes_the_lowest_loss_shape_within_the_budget(counted, capsys):
    model, batches = tiny_lm("qwen3", num_hidden_layers=4), calibration_batches()
    count = parameters_of(model, counted)
    budget = int(0.6 * count(current_shape(model)))
    report = prune_(model, MinitronConfig(target_params=budget, target_params_counted=counted,
                                          search_candidates=4), batches)
    rows = report["search"]
    assert len(rows) == 4 and all(row["parameters"] <= budget for row in rows)
    best = min(rows, key=lambda row: row["lm_loss"])
    assert report["shape_after"] == {key: best[key] for key in report["shape_after"]}
    assert count(report["shape_after"]) == best["parameters"] <= budget
    assert calibration_lm_loss(model, batches)[0] == pytest.approx(best["lm_loss"])
    printed = capsys.readouterr().out
    assert "<- best" in printed and len(printed.strip().splitlines()) == 1 + 4


@pytest.mark.parametrize("budget, message", [
    (10**9, "is not below the model's"),
    (10, "below the smallest shape the search tries"),
])
def test_budgets_the_search_cannot_meet_are_refused_unchanged(budget, message):
    model = tiny_lm("llama")
    before = state(model)
    with pytest.raises(UserError, match=message) as raised:
        prune_(model, MinitronConfig(target_params=budget), calibration_batches())
    assert "\n" not in str(raised.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("architecture, fixed, held", [
    (FAMILIES["qwen3"], dict(num_hidden_layers=2), {}),
    (FAMILIES["qwen3"], dict(num_hidden_layers=3, intermediate_size=24), {}),
    (FAMILIES["qwen3"], dict(num_attention_heads=4, num_key_value_heads=1), {}),  # whole key/value groups out
    (MHA, dict(num_attention_heads=2), dict(num_key_value_heads=2)),  # one key/value head per query head
])
def test_shape_fields_beside_a_budget_are_held_in_every_candidate(architecture, fixed, held):
    model, batches = tiny_lm("qwen3", **{**architecture, "num_hidden_layers": 4}), calibration_batches()
    count = parameters_of(model, "total")
    budget = int(0.7 * count(current_shape(model)))
    report = prune_(model, MinitronConfig(target_params=budget, search_candidates=3, **fixed), batches)
    held = {**fixed, **held}
    rows = report["search"]
    assert rows and all(row["parameters"] <= budget for row in rows)
    assert all({key: row[key] for key in held} == held for row in rows), rows
    assert {key: report["shape_after"][key] for key in held} == held
    assert parameter_count(model) == count(report["shape_after"])


@pytest.mark.parametrize("fixed, budget, message", [
    (dict(hidden_size=64), 10**4, "hidden_size=64 is larger than the model's 32"),
    (dict(num_hidden_layers=3), 10, "below the smallest shape the search tries with num_hidden_layers=3"),
    (dict(num_hidden_layers=3, hidden_size=32, intermediate_size=48, num_attention_heads=8, num_key_value_heads=2),
     10**4, "are the model's own shape: nothing is left to search"),
])
def test_a_budget_with_fixed_fields_it_cannot_meet_is_refused_unchanged(fixed, budget, message):
    model = tiny_lm("llama")
    before = state(model)
    with pytest.raises(UserError, match=message) as raised:
        prune_(model, MinitronConfig(target_params=budget, **fixed), calibration_batches())
    assert "\n" not in str(raised.value)
    assert_unchanged(model, before)


def test_depth_removal_keeps_each_blocks_own_attention_type():
    # Qwen2 with sliding-window attention in its last two blocks: a kept block keeps its window after renumbering.
    original = tiny_lm("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    types = list(original.config.layer_types)
    assert types.count("sliding_attention") == 2
    batches = calibration_batches()
    for dropped in ([0, 3], [1, 2]):
        pruned = copy.deepcopy(original)
        remove_blocks_(pruned, dropped)
        kept = [i for i in range(4) if i not in dropped]
        assert pruned.config.layer_types == [types[i] for i in kept]
        masked = copy.deepcopy(original)
        skip_with_hooks(masked, dropped)
        for batch in batches:  # 10 tokens: the 4-token window matters
            assert_same_logits(pruned, masked, original, batch)
