"""The held-out perplexity curve logged during training (`hf_modelopt.tasks.held_out`)."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from hf_modelopt.tasks.causal_lm import evaluate_perplexity
from hf_modelopt.tasks.held_out import HeldOutPerplexityCallback, perplexity_curve


def test_the_curve_has_a_point_before_training_every_n_steps_and_after_the_last(tiny_models, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama", "causal-lm"))
    held_out = torch.randint(0, model.config.vocab_size, (40,)).tolist()
    before = evaluate_perplexity(model, held_out, 16, 2)["perplexity"]
    blocks = torch.randint(0, model.config.vocab_size, (12, 8)).tolist()
    rows = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    args = TrainingArguments(str(tmp_path), max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                      callbacks=[HeldOutPerplexityCallback(held_out, 16, 2, every_steps=2, block_length=8)])
    modes = []
    trainer.add_callback(type("Mode", (TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, model=None, **kw: modes.append(model.training)})())
    trainer.train()

    curve = perplexity_curve(trainer.state.log_history)
    # steps x 2 sequences x 2 accumulated x 8 tokens
    assert [(p["step"], p["tokens_trained"]) for p in curve] == [(0, 0), (2, 64), (4, 128), (5, 160)]
    assert curve[0]["held_out_perplexity"] == pytest.approx(before, rel=1e-6)
    after = evaluate_perplexity(trainer.model, held_out, 16, 2)["perplexity"]
    assert curve[-1]["held_out_perplexity"] == pytest.approx(after, rel=1e-6) != pytest.approx(before, rel=1e-3)
    assert modes == [True] * 5  # training went on in train mode after each measurement


def test_every_steps_must_be_positive():
    with pytest.raises(ValueError, match="every_steps must be at least 1"):
        HeldOutPerplexityCallback([1, 2, 3], 2, 1, every_steps=0, block_length=8)
