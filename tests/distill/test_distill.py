"""`hf_modelopt.distill.distill`, what a script calls: refusals before any work, the transfer-text rows, the teacher
logit cache, eager attention and back, on tiny models."""

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from hf_modelopt.distill import (
    DistillationConfig,
    DistillationSettingError,
    KnowledgeDistillationConfig,
    VocabularyMismatchError,
    distill,
    student_from_teacher,
    transfer_sentences,
)
from hf_modelopt.distill.distill import CACHE_FILE
from hf_modelopt.tasks import TextClassificationData

from ..conftest import minilm_folder
from .test_trainer import tiny_bert


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_folder())


def rows(n=16):
    """Raw classification rows, as a script loads them: a `sentence` column and integer labels."""
    return datasets.Dataset.from_dict({"sentence": [f"{'a good' if i % 2 else 'a bad'} film number {i}"
                                                    for i in range(n)], "label": [i % 2 for i in range(n)]})


def training_args(folder, steps=2, **kwargs):
    return TrainingArguments(output_dir=str(folder), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, seed=0, report_to="none", save_strategy="no", disable_tqdm=True,
                             use_cpu=True, **kwargs)


DATA = TextClassificationData(text_column="sentence", max_length=16)


def test_refusals_come_before_any_work(tmp_path, tokenizer):
    teacher = tiny_bert(layers=2)
    student, _ = student_from_teacher(teacher, layers=[0])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    # Unlabelled transfer text is for classification: the same rows under the causal-LM task are refused.
    config = KnowledgeDistillationConfig(transfer_file=str(tmp_path / "transfer.txt"))
    with pytest.raises(DistillationSettingError, match="transfer_file: file not found") as err:
        distill(teacher, student, tokenizer, rows(), config, training_args(tmp_path / "o"), data=DATA)
    assert err.value.key == "transfer_file"  # (what a recipe stage reports under its own key)
    (tmp_path / "transfer.txt").write_text("some unlabelled text for the teacher to label .\n")
    with pytest.raises(DistillationSettingError, match="transfer_file: for classification only"):
        distill(teacher, student, tokenizer, rows(), config, training_args(tmp_path / "o"), data=DATA,
                task="causal-lm")
    # The logit cache covers the training rows only: no evaluation rows with it.
    with pytest.raises(DistillationSettingError, match="cache_teacher_logits: the cache covers the training set"):
        distill(teacher, student, tokenizer, rows(), KnowledgeDistillationConfig(cache_teacher_logits=True),
                training_args(tmp_path / "o"), data=DATA, eval_data=rows(4))
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert not (tmp_path / "o").exists()


def test_token_level_kd_refuses_a_student_tokenizer_of_another_vocabulary(tmp_path, tokenizer):
    config = AutoConfig.for_model("llama", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8)
    torch.manual_seed(0)
    teacher, student = AutoModelForCausalLM.from_config(config), AutoModelForCausalLM.from_config(config)
    other = AutoTokenizer.from_pretrained(minilm_folder())
    other.add_tokens(["zzz-extra"])
    text = datasets.Dataset.from_dict({"text": ["the cat sat on the mat ."] * 40})
    with pytest.raises(VocabularyMismatchError, match="token id 30522"):
        distill(teacher, student, tokenizer, text, DistillationConfig(), training_args(tmp_path / "o"),
                student_tokenizer=other)


def test_transfer_text_joins_the_training_rows_unlabelled(tmp_path, tokenizer):
    lines = ["= Heading =", "", "the film was long and the actors were tired . it rained on the set all day .",
             "too short", "a quiet evening at the cinema with friends ."]
    (tmp_path / "transfer.txt").write_text("\n".join(lines) + "\n")
    sentences = transfer_sentences(tmp_path / "transfer.txt")
    assert sentences == ["the film was long and the actors were tired .", "it rained on the set all day .",
                         "a quiet evening at the cinema with friends ."]
    teacher = tiny_bert(layers=2)
    student, copied_from = student_from_teacher(teacher, layers=[1])
    config = KnowledgeDistillationConfig(ce_weight=0.5, transfer_file="transfer.txt", max_transfer_samples=2)
    data = DATA.model_copy(update={"data_dir": str(tmp_path)})  # a relative transfer_file resolves against it
    trainer = distill(teacher, student, tokenizer, rows(16), config, training_args(tmp_path / "o"), data=data,
                      copied_from=copied_from)
    train = trainer.train_dataset
    assert len(train) == 16 + 2 and train["labels"][16:] == [-100, -100]
    assert train["example_index"] == list(range(18))
    assert train[16]["input_ids"] == tokenizer(sentences[0], max_length=16, truncation=True)["input_ids"]
    assert trainer.state.global_step == 2 and trainer.teacher is not None
    assert trainer.layer_map == {0: 1}  # the kept layer stands in for the teacher's last


def test_cached_teacher_logits_train_the_student_as_the_live_teacher_does(tmp_path, tokenizer):
    students = []
    for cached in (False, True):
        teacher = tiny_bert(layers=2)
        student, _ = student_from_teacher(teacher, layers=[0])
        config = KnowledgeDistillationConfig(ce_weight=0.5, cache_teacher_logits=cached)
        trainer = distill(teacher, student, tokenizer, rows(16), config, training_args(tmp_path / f"o-{cached}"),
                          data=DATA, shared_dir=tmp_path / f"shared-{cached}")
        students.append(trainer.model)
    assert trainer.teacher is None  # every logit came from the cache
    from safetensors.torch import load_file

    cache = load_file(tmp_path / "shared-True" / CACHE_FILE)  # in shared_dir (default: the output folder)
    assert cache["values"].shape == (16, 2)  # one row of (all two) logits per training example
    assert not (tmp_path / "shared-False").exists()
    live, cached = (dict(student.named_parameters()) for student in students)
    for name, weight in live.items():
        assert torch.allclose(weight, cached[name], atol=1e-5), name


def test_attention_losses_run_eager_and_restore_the_implementation(tmp_path, tokenizer):
    teacher = tiny_bert(layers=2)
    student, copied_from = student_from_teacher(teacher, layers=[0])
    seen = []

    def run_training(trainer):
        seen.append((trainer.model.config._attn_implementation, trainer.teacher.config._attn_implementation))
        trainer.train()

    config = KnowledgeDistillationConfig(attention_weight=1.0, kd_weight=1.0)
    trainer = distill(teacher, student, tokenizer, rows(8), config, training_args(tmp_path / "o", steps=1),
                      data=DATA, copied_from=copied_from, run_training=run_training)
    assert seen == [("eager", "eager")] and trainer.state.global_step == 1
    assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"
