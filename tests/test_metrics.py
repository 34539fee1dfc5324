import math

import pytest
import torch

from hf_modelopt.metrics import classification_metrics, evaluate_perplexity


def test_accuracy_and_binary_f1_by_hand():
    metrics = classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    # class 1: tp=2, predicted 3, actual 3 -> f1 = 4 / 6
    assert metrics["f1"] == pytest.approx(2 / 3)


def test_multiclass_f1_is_macro():
    metrics = classification_metrics([0, 1, 2, 2], [0, 1, 2, 1])
    f1_per_class = [1.0, 2 * 1 / (1 + 2), 2 * 1 / (2 + 1)]
    assert metrics["f1"] == pytest.approx(sum(f1_per_class) / 3)


class UniformLM(torch.nn.Module):
    """Predicts every token with probability 1 / vocab: perplexity must equal the vocabulary size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        class Out:
            logits = torch.zeros(*input_ids.shape, self.vocab)

        return Out()


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    metrics = evaluate_perplexity(UniformLM(50), list(range(40)) * 3, window=16, batch_size=4)
    assert metrics["perplexity"] == pytest.approx(50.0)
    assert metrics["eval_tokens"] == 120


def test_perplexity_matches_the_models_own_loss(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("gpt2", "causal-lm")).eval()
    ids = list(range(100, 164))  # exactly two windows of 32
    expected = [model(input_ids=torch.tensor([ids[i:i + 32]]), labels=torch.tensor([ids[i:i + 32]])).loss.item()
                for i in (0, 32)]
    metrics = evaluate_perplexity(model, ids, window=32, batch_size=2)
    assert metrics["perplexity"] == pytest.approx(math.exp(sum(expected) / 2), rel=1e-4)


def test_evaluate_model_takes_a_data_config_or_a_dataset_and_infers_the_task(tiny_models, sst2_files):
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_modelopt import evaluate_model
    from hf_modelopt.data import load_split
    from hf_modelopt.metrics import infer_task

    folder = tiny_models("bert")
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    from hf_modelopt.tasks import TextClassificationData

    config = TextClassificationData(data_dir=str(sst2_files), eval_file="sst2/validation.tsv", text_column="sentence")
    from_config = evaluate_model(model, tokenizer, config)
    rows = load_split(config, "eval")
    from_dataset = evaluate_model(model, tokenizer, datasets.Dataset.from_dict(rows.to_dict()), config=config)
    assert from_config == from_dataset and from_config["eval_samples"] == len(rows)
    assert infer_task(model) == "text-classification"
    with pytest.raises(ValueError, match="pass task="):
        infer_task(torch.nn.Linear(2, 2))
