import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
)

from hf_modelopt.distill import VocabularyMismatchError, check_same_vocabulary
from hf_modelopt.distill.cache import CachedTeacherCollator, TeacherLogitCache, build_teacher_logit_cache
from hf_modelopt.distill.student import student_from_teacher
from hf_modelopt.distill.trainer import DistillationTrainer, task_cross_entropy
from hf_modelopt.stages.distill import DistillStageConfig

from ..conftest import minilm_folder


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_folder())


def tiny_bert(hidden=32, layers=2, seed=0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("bert", vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=2 * hidden, num_labels=2)
    return AutoModelForSequenceClassification.from_config(config)


def sentence_dataset(tokenizer, n=16):
    import datasets

    texts = [f"{'a good' if i % 2 else 'a bad'} film number {i}" for i in range(n)]
    encoded = tokenizer(texts, truncation=True, max_length=16)
    return datasets.Dataset.from_dict({**encoded, "labels": [i % 2 for i in range(n)],
                                       "example_index": list(range(n))})


def make_trainer(tmp_path, tokenizer, teacher, student, config, collator=None, steps=2, layer_map=None):
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1,
                             remove_unused_columns=False, disable_tqdm=True, use_cpu=True)
    return DistillationTrainer(model=student, teacher=teacher, distillation=config, args=args,
                               layer_map=layer_map,
                               train_dataset=sentence_dataset(tokenizer),
                               data_collator=collator or DataCollatorWithPadding(tokenizer))


def test_teacher_is_frozen_and_not_saved_and_terms_are_logged(tmp_path, tokenizer):
    teacher = tiny_bert(layers=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, kept = student_from_teacher(teacher, layers=[0, 3])
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    config = DistillStageConfig(student={"layers": [0, 3]}, ce_weight=0.5, hidden_weight=1.0, cosine_weight=0.5,
                                attention_weight=0.1)
    teacher.set_attn_implementation("eager")
    student.set_attn_implementation("eager")
    trainer = make_trainer(tmp_path, tokenizer, teacher, student, config, layer_map=dict(enumerate(kept)))
    assert trainer.layer_map == {0: 0, 1: 3}
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    logged = trainer.state.log_history[0]
    assert {"kd_loss", "ce_loss", "hidden_loss", "cosine_loss", "attention_loss"} <= set(logged)
    trainer.save_model(tmp_path / "saved")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert set(saved) == set(student.state_dict())  # no teacher, no projection weights
    assert kept == [0, 3]


def test_layer_map_with_projection_when_widths_differ(tmp_path, tokenizer):
    teacher, student = tiny_bert(hidden=32, layers=4), tiny_bert(hidden=16, layers=2, seed=1)
    config = DistillStageConfig(student={"name_or_path": "unused"}, kd_weight=0.0, hidden_weight=1.0)
    trainer = make_trainer(tmp_path, tokenizer, teacher, student, config, steps=3)
    trainer.layer_map = {0: 1, 1: 3}
    trainer.projections = torch.nn.ModuleDict({str(i): torch.nn.Linear(16, 32) for i in trainer.layer_map})
    initial = {k: v.clone() for k, v in trainer.projections.state_dict().items()}
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in trainer.projections.parameters())
    assert any(not torch.equal(initial[k], v) for k, v in trainer.projections.state_dict().items())
    # The hidden loss compares student layer i's output with the mapped teacher layer's, projected.
    batch = DataCollatorWithPadding(tokenizer)([sentence_dataset(tokenizer)[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    student.eval()  # no dropout: both computations must see the same activations
    with torch.no_grad():
        s = student(**inputs, output_hidden_states=True).hidden_states
        t = teacher(**inputs, output_hidden_states=True).hidden_states
        from hf_modelopt.distill.losses import hidden_mse

        expected = sum(hidden_mse(s[i + 1], t[j + 1], trainer.projections[str(i)], inputs["attention_mask"])
                       for i, j in {0: 1, 1: 3}.items()) / 2
        assert trainer.compute_loss(student, dict(batch)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_default_projection_is_created_for_different_widths(tmp_path, tokenizer):
    teacher, student = tiny_bert(hidden=32, layers=4), tiny_bert(hidden=16, layers=2)
    config = DistillStageConfig(student={"name_or_path": "unused"}, hidden_weight=1.0)
    trainer = make_trainer(tmp_path, tokenizer, teacher, student, config)
    assert trainer.layer_map == {0: 1, 1: 3}
    assert trainer.projections["0"].weight.shape == (32, 16)


@pytest.mark.parametrize("task", ["text-classification", "causal-lm"])
def test_cached_and_live_kd_give_the_same_loss(tmp_path, tokenizer, task):
    if task == "text-classification":
        teacher = tiny_bert(layers=2).eval()
        student = tiny_bert(layers=1, seed=3)
        top_k = None
    else:
        config = AutoConfig.for_model("llama", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8)
        torch.manual_seed(0)
        teacher, student = AutoModelForCausalLM.from_config(config).eval(), AutoModelForCausalLM.from_config(config)
        top_k = 8
    config = DistillStageConfig(student={"layers": [0]}, top_k=top_k, ce_weight=0.3, temperature=2.0)
    dataset = sentence_dataset(tokenizer)
    if task == "causal-lm":  # sentences of different lengths: exercises the padded token-level cache
        dataset = dataset.remove_columns("labels")
    collator = DataCollatorWithPadding(tokenizer)
    path = build_teacher_logit_cache(teacher, dataset, collator, tmp_path / "cache.safetensors", top_k, batch_size=5)
    cache = TeacherLogitCache(path)
    assert len(cache) == len(dataset)
    live = make_trainer(tmp_path, tokenizer, teacher, student, config)
    cached = make_trainer(tmp_path, tokenizer, None, student, config, collator=CachedTeacherCollator(collator, cache))
    features = [dataset[i] for i in (7, 2, 11, 0)]  # any order: rows are found by example_index
    student.eval()  # no dropout: both losses must see the same student outputs
    with torch.no_grad():
        live_loss = live.compute_loss(student, collator(features))
        cached_loss = cached.compute_loss(student, cached.data_collator(features))
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-6)


def test_vocabulary_mismatch_names_the_first_difference(tokenizer):
    check_same_vocabulary(tokenizer, tokenizer)
    other = AutoTokenizer.from_pretrained(minilm_folder())
    other.add_tokens(["hfmodelopt-new-token"])
    with pytest.raises(VocabularyMismatchError, match="token id 30522: teacher None, student 'hfmodelopt-new-token'"):
        check_same_vocabulary(tokenizer, other)


def test_task_cross_entropy_ignores_unlabelled_examples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
    labels = torch.tensor([0, 1, -100])
    expected = torch.nn.functional.cross_entropy(logits[:2], labels[:2])
    assert task_cross_entropy(logits, labels).item() == pytest.approx(expected.item())
    assert task_cross_entropy(logits, torch.full((3,), -100)).item() == 0.0


def test_config_rejects_cache_with_feature_losses_and_all_zero_weights():
    with pytest.raises(ValueError, match="live teacher"):
        DistillStageConfig(student={"every": 2}, cache_teacher_logits=True, hidden_weight=1.0)
    with pytest.raises(ValueError, match="all loss weights are 0"):
        DistillStageConfig(student={"every": 2}, kd_weight=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        DistillStageConfig(student={"every": 2, "layers": [0]})


def test_default_layer_maps():
    from hf_modelopt.distill.trainer import default_layer_map

    assert default_layer_map(3, 6, copied_from=[0, 2, 4]) == {0: 1, 1: 3, 2: 5}
    assert default_layer_map(2, 6, copied_from=[0, 5]) == {0: 4, 1: 5}
    assert default_layer_map(3, 3, copied_from=[0, 1, 2]) == {0: 0, 1: 1, 2: 2}
    assert default_layer_map(2, 4) == {0: 1, 1: 3}
    assert default_layer_map(3, 30) == {0: 9, 1: 19, 2: 29}


def test_resumed_training_continues_with_the_saved_projections(tmp_path, tokenizer):
    def trainer_for(max_steps):
        teacher, student = tiny_bert(hidden=32, layers=4), tiny_bert(hidden=16, layers=2, seed=1)
        config = DistillStageConfig(student={"name_or_path": "unused"}, hidden_weight=1.0)
        args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), max_steps=max_steps, save_strategy="steps",
                                 save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
                                 remove_unused_columns=False, disable_tqdm=True, use_cpu=True)
        return DistillationTrainer(model=student, teacher=teacher, distillation=config, args=args,
                                   train_dataset=sentence_dataset(tokenizer),
                                   data_collator=DataCollatorWithPadding(tokenizer))

    uninterrupted = trainer_for(4)
    uninterrupted.train()  # saves checkpoint-2 on the way
    assert all(p.grad is None for p in uninterrupted.projections.parameters())  # zeroed after every step
    resumed = trainer_for(4)  # new random projections: only the checkpoint can make them equal
    resumed.args.output_dir = str(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "ckpt" / "checkpoint-2"))
    for name, value in uninterrupted.projections.state_dict().items():
        assert torch.equal(resumed.projections.state_dict()[name], value), name
    assert all(torch.equal(resumed.model.state_dict()[k], v) for k, v in uninterrupted.model.state_dict().items())
