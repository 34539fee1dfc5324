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

from hf_modelopt.distill.student import transformer_layers
from hf_modelopt.prune.structured import (
    LAYOUTS,
    block_layout,
    choose_kept,
    head_geometry,
    magnitude_importance,
    remove_heads_and_neurons_,
)

from ..conftest import DECODERS, TINY_CONFIGS, VISION

# Beyond the shared tiny configs: DeBERTa with its relative-position attention (and its own position
# projections, which have a row block per head too).
OVERRIDES = {"deberta-v2": dict(relative_attention=True, pos_att_type="p2c|c2p", max_relative_positions=32)}
# Models whose config states an explicit head size: pruned to the same counts in every layer, plain
# transformers loads them.
PLAIN_WITH_FEWER_HEADS = {"vit", "phi", "llama", "mistral", "qwen2", "qwen3"}


def _build(model_type):
    config = transformers.AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type],
                                               **OVERRIDES.get(model_type, {}))
    if model_type in VISION:
        auto = transformers.AutoModelForImageClassification
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
    return {"input_ids": ids, "attention_mask": mask}


def _outputs(model, inputs):
    with torch.no_grad():
        out = model.eval()(**inputs, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def _random_kept(model, rng):
    """Per layer a random set of heads (each key/value group keeping as many) and of neurons; the counts
    differ between layers."""
    heads, kv_heads, _ = head_geometry(model.config)
    group = heads // kv_heads
    layout = block_layout(model)
    prefix, layers = transformer_layers(model)
    keep_heads, keep_neurons = [], []
    for i in range(len(layers)):
        if group > 1:  # the first layer keeps half of each group, the others all
            per_group = group // 2 if i == 0 else group
            keep_heads.append(sorted(g * group + h for g in range(kv_heads)
                                     for h in rng.sample(range(group), per_group)))
        else:
            keep_heads.append(sorted(rng.sample(range(heads), heads - 1 - i % (heads - 1))))
        width = model.get_submodule(f"{prefix}.{i}.{layout.ffn_out}").weight.shape
        width = width[1] if isinstance(model.get_submodule(f"{prefix}.{i}.{layout.ffn_out}"), torch.nn.Linear) \
            else width[0]
        keep_neurons.append(sorted(rng.sample(range(width), width // 2 - 3 * i)))
    return keep_heads, keep_neurons


def _mask_(model, keep_heads, keep_neurons):
    """Zero the output-projection columns of the dropped heads and neurons: they then contribute nothing."""
    layout = block_layout(model)
    heads, _, head_dim = head_geometry(model.config)
    prefix, _ = transformer_layers(model)
    with torch.no_grad():
        for i, (kept_heads, kept_neurons) in enumerate(zip(keep_heads, keep_neurons)):
            for name, kept, size in ((layout.out, kept_heads, head_dim), (layout.ffn_out, kept_neurons, 1)):
                module = model.get_submodule(f"{prefix}.{i}.{name}")
                # (out, in) view; GPT-2's Conv1D stores (in, out)
                weight = module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()
                dropped = [u for u in range(weight.shape[1] // size) if u not in kept]
                for unit in dropped:
                    weight[:, unit * size:(unit + 1) * size] = 0
    assert heads  # (the geometry was read from the unpruned config)


def test_every_layout_has_a_tiny_model():
    assert set(LAYOUTS) <= set(TINY_CONFIGS)
    with pytest.raises(ValueError, match="does not support model_type 't5'.*supported: bert"):
        block_layout(transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY_CONFIGS["t5"])))


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
        model = _build(model_type)
        heads, kv_heads, _ = head_geometry(model.config)
        keep_heads, keep_neurons = choose_kept(*magnitude_importance(model), 0.5, 0.25, kv_heads)
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
