import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from hf_modelopt.prune.callback import PruningCallback
from hf_modelopt.prune.config import PruningConfig, ScheduleConfig
from hf_modelopt.prune.masks import masks_from_scores, prunable_linears, sparsity_of


class RandomText(torch.utils.data.Dataset):
    def __init__(self, n=64, length=12, vocab=1000):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, vocab, (n, length), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _train(folder, output, config, resume=None, **args):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    callback = PruningCallback(config)
    args = {"save_strategy": "no", "dataloader_pin_memory": False, **args}
    arguments = TrainingArguments(output_dir=str(output), report_to="none", per_device_train_batch_size=8,
                                  learning_rate=1e-2, seed=0, disable_tqdm=True, **args)
    trainer = Trainer(model=model, args=arguments, train_dataset=RandomText(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def test_layer_and_global_masks_drop_exact_counts():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0, 30.0)}
    layer = masks_from_scores(scores, 0.5, "layer")
    assert int((~layer["a"]).sum()) == 5 and int((~layer["b"]).sum()) == 10
    glob = masks_from_scores(scores, 0.5, "global")
    assert int((~glob["a"]).sum()) == 10 and int((~glob["b"]).sum()) == 5
    again = masks_from_scores({"a": torch.arange(10.0).flip(0), "b": scores["b"]}, 0.5, "layer", previous=layer)
    assert not (again["a"] & ~layer["a"]).any()  # what was dropped stays dropped


def test_default_targets_are_the_block_linears_only(tiny_models):
    for model_type, task in (("bert", "text-classification"), ("llama", "causal-lm"), ("gpt2", "causal-lm")):
        from hf_modelopt.modeling import auto_model_class

        model = auto_model_class(task).from_pretrained(tiny_models(model_type, task))
        names = list(prunable_linears(model))
        assert names and all(".layer" in n or ".h." in n or ".layers." in n for n in names), names
        assert not any("embed" in n or "classifier" in n or "lm_head" in n or "norm" in n for n in names)


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_masks_stay_zero_through_optimizer_steps_and_accumulation(tiny_models, tmp_path, mixed_precision):
    config = PruningConfig(sparsity=0.7, schedule=ScheduleConfig(kind="cubic", end_step=4, update_every=1))
    trainer, callback = _train(tiny_models("bert"), tmp_path / "o", config, max_steps=8,
                               gradient_accumulation_steps=2, weight_decay=0.1, bf16=mixed_precision,
                               use_cpu=mixed_precision)
    modules = prunable_linears(trainer.model)
    assert abs(sparsity_of(modules) - 0.7) < 1e-3
    for name, mask in callback.masks.items():
        assert (modules[name].weight[~mask] == 0).all()  # 4 more optimizer steps with momentum after the end
    logged = [r for r in trainer.state.log_history if "sparsity" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and logged[-1]["sparsity"] >= 0.7 - 1e-3


def test_movement_scope_global_reaches_target(tiny_models, tmp_path):
    config = PruningConfig(sparsity=0.5, method="movement", scope="global",
                           schedule=ScheduleConfig(kind="linear", end_step=4, update_every=2))
    trainer, _ = _train(tiny_models("bert"), tmp_path / "o", config, max_steps=6)
    assert abs(sparsity_of(prunable_linears(trainer.model)) - 0.5) < 1e-3


def test_resume_restores_masks_and_ends_identical(tiny_models, tmp_path):
    config = PruningConfig(sparsity=0.8, method="movement", schedule=ScheduleConfig(end_step=8, update_every=2))
    straight = _train(tiny_models("bert"), tmp_path / "a", config, max_steps=10)[0].model
    _train(tiny_models("bert"), tmp_path / "b", config, max_steps=10, save_strategy="steps", save_steps=5)
    assert (tmp_path / "b" / "checkpoint-5" / "pruning_state.safetensors").is_file()
    # Resume from the mid-schedule checkpoint in a new process-like setting (fresh model, fresh callback).
    resumed, callback = _train(tiny_models("bert"), tmp_path / "b", config, max_steps=10,
                               resume=str(tmp_path / "b" / "checkpoint-5"))
    resumed = resumed.model
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_schedule_cut_short_prunes_the_rest_unless_the_run_was_interrupted(tiny_models, tmp_path, monkeypatch):
    from hf_modelopt import interrupt

    config = PruningConfig(sparsity=0.8, schedule=ScheduleConfig(end_step=20, update_every=1))
    trainer, _ = _train(tiny_models("bert"), tmp_path / "a", config, max_steps=4)
    assert sparsity_of(prunable_linears(trainer.model)) == pytest.approx(0.8, abs=1e-3)  # the output gets the target
    monkeypatch.setattr(interrupt._state, "requested", 15)  # SIGTERM noted: the checkpoint keeps the schedule
    trainer, callback = _train(tiny_models("bert"), tmp_path / "b", config, max_steps=4)
    assert callback.target < 0.8
    assert sparsity_of(prunable_linears(trainer.model)) == pytest.approx(callback.target, abs=1e-3)
