import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hf_modelopt.distill.student import transformer_layers
from hf_modelopt.modeling import auto_model_class
from hf_modelopt.prune.structured import (
    block_layout,
    choose_kept,
    gradient_importance,
    head_geometry,
    magnitude_importance,
    remove_heads_and_neurons_,
)

CASES = [("bert", "text-classification"), ("distilbert", "text-classification"), ("roberta", "text-classification"),
         ("llama", "causal-lm"), ("qwen2", "causal-lm")]


def _inputs():
    torch.manual_seed(1)
    ids = torch.randint(5, 1000, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs):
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    return logits * inputs["attention_mask"].unsqueeze(-1) if logits.dim() == 3 else logits


@pytest.mark.parametrize("model_type,task", CASES)
def test_removing_zeroed_heads_and_neurons_keeps_outputs_identical(tiny_models, model_type, task):
    model = auto_model_class(task).from_pretrained(tiny_models(model_type, task))
    layout = block_layout(model)
    heads, kv_heads, head_dim = head_geometry(model.config)
    group = heads // kv_heads
    prefix, layers = transformer_layers(model)
    keep_heads, keep_neurons = [], []
    with torch.no_grad():
        for i in range(len(layers)):
            out = model.get_submodule(f"{prefix}.{i}.{layout.out}").weight
            down = model.get_submodule(f"{prefix}.{i}.{layout.ffn_out}").weight
            dropped_head = [g * group + group - 1 for g in range(kv_heads)] if group > 1 else [i % heads]
            for h in dropped_head:  # the head's output projection columns are zero: it contributes nothing
                out[:, h * head_dim:(h + 1) * head_dim] = 0
            down[:, ::2] = 0
            keep_heads.append([h for h in range(heads) if h not in dropped_head])
            keep_neurons.append(list(range(1, down.shape[1], 2)))
    inputs = _inputs()
    before = _logits(model, inputs)
    remove_heads_and_neurons_(model, keep_heads, keep_neurons)
    after = _logits(model, inputs)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in auto_model_class(task).from_pretrained(tiny_models(model_type, task)).parameters())


@pytest.mark.parametrize("model_type,task,plain", [("bert", "text-classification", False),
                                                    ("llama", "causal-lm", True)])
def test_pruned_model_reloads_in_a_fresh_process(tiny_models, tmp_path, model_type, task, plain):
    folder = tiny_models(model_type, task)
    model = auto_model_class(task).from_pretrained(folder)
    batches = [{**_inputs(), "labels": torch.tensor([0, 1, 1]) if task != "causal-lm" else _inputs()["input_ids"]}]
    head_scores, neuron_scores = gradient_importance(model, batches)
    _, kv_heads, _ = head_geometry(model.config)
    keep_heads, keep_neurons = choose_kept(head_scores, neuron_scores, 0.5, 0.5, kv_heads)
    remove_heads_and_neurons_(model, keep_heads, keep_neurons)
    model.save_pretrained(tmp_path / "pruned")
    AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path / "pruned")
    assert ("quantization_config" not in (tmp_path / "pruned" / "config.json").read_text()) == plain
    from hf_modelopt.export.verify import verify_reload

    verify_reload(tmp_path / "pruned", model, AutoTokenizer.from_pretrained(folder), task, atol=1e-5)
    if plain:  # plain transformers, without hf_modelopt imported
        code = (f"from transformers import AutoModelForCausalLM; m = AutoModelForCausalLM.from_pretrained("
                f"{str(tmp_path / 'pruned')!r}); print(m.config.num_attention_heads)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert result.stdout.strip() == str(model.config.num_attention_heads)


def test_magnitude_importance_ranks_a_zeroed_head_last(tiny_models):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight[:16] = 0
        model.bert.encoder.layer[0].attention.output.dense.weight[:, :16] = 0
    heads, neurons = magnitude_importance(model)
    assert int(heads[0].argmin()) == 0 and len(neurons) == 2


def test_gqa_groups_stay_consistent(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama", "causal-lm"))
    scores = [torch.tensor([4.0, 3.0, 2.0, 1.0])] * 2  # 4 query heads, 2 key/value heads
    keep, _ = choose_kept(scores, [torch.ones(64)] * 2, 0.5, 0.5, kv_heads=2)
    assert keep == [[0, 2], [0, 2]]  # one query head per key/value group
    with pytest.raises(ValueError, match="same number of query heads"):
        remove_heads_and_neurons_(model, [[0, 1], [0, 1]], None)
