"""The card's figures on tiny models, without a subprocess."""

import torch

from hf_modelopt.export.card import card_tags
from hf_modelopt.export.measure import linear_zero_fraction, parameter_count, weights_size
from hf_modelopt.modeling import auto_model_class


def test_linear_zero_fraction_counts_exact_zeros_of_linear_weights_only(tiny_models):
    model = auto_model_class("causal-lm").from_pretrained(tiny_models("gpt2", "causal-lm"))  # Conv1D layers
    assert linear_zero_fraction(model) == 0.0
    layers = [m for m in model.modules() if m.__class__.__name__ == "Conv1D"]
    with torch.no_grad():
        layers[0].weight.zero_()
    total = sum(m.weight.numel() for m in model.modules() if m.__class__.__name__ == "Conv1D")
    total += sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # lm_head
    assert linear_zero_fraction(model) == layers[0].weight.numel() / total
    assert parameter_count(model) == sum(p.numel() for p in model.parameters())

    classifier = auto_model_class("text-classification").from_pretrained(tiny_models("bert"))
    with torch.no_grad():
        classifier.bert.embeddings.word_embeddings.weight.zero_()  # not a Linear weight
    assert linear_zero_fraction(classifier) == 0.0


def test_weights_size_counts_the_loaded_weights(tiny_models, tmp_path):
    folder = tiny_models("bert")
    assert weights_size(folder) == (folder / "model.safetensors").stat().st_size
    (tmp_path / "m.gguf").write_bytes(b"0" * 10)
    assert weights_size(tmp_path, "m.gguf") == 10 and weights_size(tmp_path) is None


def test_tags_say_what_was_done_and_how():
    """From the plain records the runner hands the export: each stage's declared card tags, then the types (and
    methods) of the stages that changed the model."""
    measures = {"changes_model": False}
    stages = [{"type": "evaluate", **measures}, {"type": "finetune", "changes_model": True},
              {"type": "distill", "config": {}, "changes_model": True, "card_tags": ["distilled"]},
              {"type": "prune", "config": {"method": "gmp"}, "changes_model": True, "card_tags": ["pruned"]},
              {"type": "quantize", "config": {"method": "nf4"}, "changes_model": True, "card_tags": ["quantized"]},
              {"type": "export", **measures}]
    assert card_tags(stages) == ["hf-modelopt", "distilled", "pruned", "quantized", "finetune", "distill", "prune",
                                 "gmp", "quantize", "nf4"]
