"""Structured pruning on every model type `LAYOUTS` supports: removing heads / neurons changes nothing but the
parameter count (against the same heads / neurons masked to zero), and the pruned models reload in a fresh
process, with plain transformers where their config can state the new shapes."""

import json
import random
import subprocess
import sys

import pytest
import torch
import transformers

from hf_modelopt.prune.structured import (
    LAYOUTS,
    choose_kept,
    magnitude_importance,
    prunable_blocks,
    remove_heads_and_neurons_,
    same_heads_layers,
)

from ..conftest import DECODERS, ENCODER_DECODERS, TINY_CONFIGS, VISION

# Beyond the shared tiny configs: DeBERTa with its relative-position attention (and its own position
# projections, which have a row block per head too).
OVERRIDES = {"deberta-v2": dict(relative_attention=True, pos_att_type="p2c|c2p", max_relative_positions=32)}
# Models whose config states an explicit head size: pruned to the same counts in every layer, plain
# transformers loads them.
PLAIN_WITH_FEWER_HEADS = {"vit", "phi", "llama", "mistral", "qwen2", "qwen3"}
# Also pruned to uniform counts: one model per other FFN width key (the BERT-likes and GPT-NeoX share
# `intermediate_size` with the plain ones), whose config states the width while the heads go to layer shapes.
UNIFORM = PLAIN_WITH_FEWER_HEADS | {"distilbert", "gpt2", "opt", "bart", "t5"}


def _build(model_type):
    config = transformers.AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type],
                                               **OVERRIDES.get(model_type, {}))
    if model_type in VISION:
        auto = transformers.AutoModelForImageClassification
    elif model_type in ENCODER_DECODERS:
        auto = transformers.AutoModelForSeq2SeqLM
    elif model_type in DECODERS:
        auto = transformers.AutoModelForCausalLM
    else:
        auto = transformers.AutoModelForSequenceClassification
    if model_type not in VISION:
        config.vocab_size = 300
    config.num_labels = 2
    torch.manual_seed(0)
    return auto.from_config(config).eval()


def _inputs(model_type):
    torch.manual_seed(1)
    if model_type in VISION:
        return {"pixel_values": torch.randn(3, 3, 32, 32)}
    ids = torch.randint(5, 300, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    if model_type in ENCODER_DECODERS:
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids, "attention_mask": mask}


def _outputs(model, inputs):
    with torch.no_grad():
        out = model.eval()(**inputs, output_hidden_states=True)
    hidden = out.decoder_hidden_states if hasattr(out, "decoder_hidden_states") else out.hidden_states
    return out.logits, hidden[-1]


def _linear_weight(module):
    """(out, in): GPT-2's Conv1D stores (in, out)."""
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()


def _random_kept(model, rng):
    """Per layer a random set of heads (each key/value group keeping as many) and of neurons; the counts
    differ between layers."""
    keep_heads, keep_neurons, stack_heads = [], [], {}
    for i, block in enumerate(prunable_blocks(model)):
        heads, kv_heads = block.heads, block.kv_heads
        group = heads // kv_heads
        if block.layout.shared_head_bias and block.stack in stack_heads:  # T5: the same heads in the whole stack
            keep_heads.append(stack_heads[block.stack])
        elif group > 1:  # the first layer keeps half of each group, the others all
            per_group = group // 2 if i == 0 else group
            keep_heads.append(sorted(g * group + h for g in range(kv_heads)
                                     for h in rng.sample(range(group), per_group)))
        else:
            keep_heads.append(sorted(rng.sample(range(heads), heads - 1 - i % (heads - 1))))
        stack_heads.setdefault(block.stack, keep_heads[-1])
        width = _linear_weight(model.get_submodule(block.prefix + block.layout.ffn_out)).shape[1]
        keep_neurons.append(sorted(rng.sample(range(width), width // 2 - 3 * i)))
    return keep_heads, keep_neurons


def _mask_(model, keep_heads, keep_neurons):
    """Zero the output-projection columns of the dropped heads and neurons: they then contribute nothing."""
    with torch.no_grad():
        for block, kept_heads, kept_neurons in zip(prunable_blocks(model), keep_heads, keep_neurons):
            for name, kept, size in ((block.layout.out, kept_heads, block.head_dim),
                                     (block.layout.ffn_out, kept_neurons, 1)):
                weight = _linear_weight(model.get_submodule(block.prefix + name))
                for unit in range(weight.shape[1] // size):
                    if unit not in kept:
                        weight[:, unit * size:(unit + 1) * size] = 0


def test_every_layout_has_a_tiny_model():
    assert set(LAYOUTS) <= set(TINY_CONFIGS)
    gptj = transformers.GPTJForCausalLM(transformers.GPTJConfig(n_embd=32, n_layer=1, n_head=2, rotary_dim=8,
                                                               vocab_size=100))
    with pytest.raises(ValueError, match="does not support model_type 'gptj'; supported: bart, bert, "):
        remove_heads_and_neurons_(gptj, [[0]], None)


def test_t5_stack_keeps_the_same_heads_in_every_block():
    model = _build("t5")
    assert same_heads_layers(model) == [[0, 1], [2, 3]]
    keep_heads, _ = choose_kept(*magnitude_importance(model), 0.5, 0.5, 4, same_heads_layers(model))
    assert keep_heads[0] == keep_heads[1] and keep_heads[2] == keep_heads[3]
    with pytest.raises(ValueError, match="every block of encoder.block must keep the same heads"):
        remove_heads_and_neurons_(model, [[0, 1], [1, 2], [0, 1], [0, 1]], None)
    assert model.encoder.block[0].layer[0].SelfAttention.q.out_features == 32  # nothing changed


def test_removal_equals_masking_and_reloads_in_a_fresh_process(tmp_path):
    rng = random.Random(0)
    expected, folders = {}, {}
    for model_type in sorted(LAYOUTS):
        model = _build(model_type)
        before = sum(p.numel() for p in model.parameters())
        keep_heads, keep_neurons = _random_kept(model, rng)
        _mask_(model, keep_heads, keep_neurons)
        inputs = _inputs(model_type)
        masked = _outputs(model, inputs)
        remove_heads_and_neurons_(model, keep_heads, keep_neurons)
        removed = _outputs(model, inputs)
        for a, b in zip(removed, masked):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=model_type)
        assert sum(p.numel() for p in model.parameters()) < before, model_type
        model.save_pretrained(tmp_path / model_type)
        folders[model_type] = str(tmp_path / model_type)
        expected[model_type] = removed[0]

        # Same counts in every layer (as `choose_kept` makes them): plain transformers loads the models whose
        # config states an explicit head size.
        if model_type not in UNIFORM:
            continue
        model = _build(model_type)
        kv_heads = [block.kv_heads for block in prunable_blocks(model)]
        keep_heads, keep_neurons = choose_kept(*magnitude_importance(model), 0.5, 0.25, kv_heads,
                                               same_heads_layers(model))
        remove_heads_and_neurons_(model, keep_heads, keep_neurons)
        uniform = f"{model_type}-uniform"
        model.save_pretrained(tmp_path / uniform)
        config = json.loads((tmp_path / uniform / "config.json").read_text())
        assert ("quantization_config" not in config) == (model_type in PLAIN_WITH_FEWER_HEADS), model_type
        folders[uniform] = str(tmp_path / uniform)
        expected[uniform] = _outputs(model, inputs)[0]
    torch.save({name: _inputs(name.removesuffix("-uniform")) for name in folders}, tmp_path / "inputs.pt")
    plain = sorted(name for name in folders if name.removesuffix("-uniform") in PLAIN_WITH_FEWER_HEADS
                   and name.endswith("-uniform"))
    others = sorted(set(folders) - set(plain))
    # One fresh process: the plain models load before hf_modelopt is imported, the others after.
    code = f"""
import sys, torch, transformers
folders, inputs = {folders!r}, torch.load({str(tmp_path / "inputs.pt")!r})
def load(name):
    config = transformers.AutoConfig.from_pretrained(folders[name])
    arch = getattr(transformers, config.architectures[0])
    with torch.no_grad():
        return arch.from_pretrained(folders[name]).eval()(**inputs[name]).logits
logits = {{name: load(name) for name in {plain!r}}}
assert "hf_modelopt" not in sys.modules
import hf_modelopt
logits.update({{name: load(name) for name in {others!r}}})
torch.save(logits, {str(tmp_path / "logits.pt")!r})
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = torch.load(tmp_path / "logits.pt")
    for name, logits in expected.items():
        torch.testing.assert_close(reloaded[name], logits, rtol=1e-5, atol=1e-5, msg=name)


def test_unstructured_pruning_targets_both_stacks_of_an_encoder_decoder():
    from hf_modelopt.prune.masks import prunable_linears

    names = prunable_linears(_build("t5"), targets=["*.SelfAttention.q"])
    assert sorted(names) == [f"{side}.block.{i}.layer.0.SelfAttention.q" for side in ("decoder", "encoder")
                             for i in range(2)]


def test_phi_with_qk_layernorm_records_fewer_heads_as_layer_shapes():
    # Its q/k LayerNorms are sized hidden_size // num_attention_heads: fewer heads in the config would resize them.
    OVERRIDES["phi"] = dict(qk_layernorm=True)
    try:
        model = _build("phi")
    finally:
        del OVERRIDES["phi"]
    keep_heads, keep_neurons = [[0, 2], [1, 3]], [list(range(0, 64, 2))] * 2
    _mask_(model, keep_heads, keep_neurons)
    masked = _outputs(model, _inputs("phi"))
    remove_heads_and_neurons_(model, keep_heads, keep_neurons)
    torch.testing.assert_close(_outputs(model, _inputs("phi")), masked, rtol=1e-5, atol=1e-5)
    assert model.config.num_attention_heads == 4 and "layer_shapes" in model.config.quantization_config
