"""KD on text the teacher writes itself (`hf_modelopt.distill.generate`, `distillation.generated_text`)."""

import json

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_modelopt.distill import DistillationSettingError, KnowledgeDistillationConfig, distill, student_from_teacher
from hf_modelopt.distill.generate import TEXT_FILE, GeneratedTextConfig, teacher_prompts, teacher_text
from hf_modelopt.errors import UserError
from hf_modelopt.tasks import CausalLMData

from ..conftest import minilm_folder
from .test_distill import DATA, rows, training_args
from .test_trainer import tiny_bert

LINES = ["the cat sat on the mat and looked at the birds in the garden for a long time .", "too short .",
         "", "a quiet evening at the cinema with friends and a large bowl of popcorn for everyone ."]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_folder())


def tiny_llama(seed=0):
    config = AutoConfig.for_model("llama", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def test_prompts_are_the_start_of_each_line_long_enough(tokenizer):
    prompts = teacher_prompts(LINES, tokenizer, GeneratedTextConfig(samples=5, prompt_tokens=6))
    assert prompts == [tokenizer(LINES[i], add_special_tokens=False)["input_ids"][:6] for i in (0, 3)]
    assert teacher_prompts(LINES, tokenizer, GeneratedTextConfig(samples=1, prompt_tokens=6)) == prompts[:1]
    with pytest.raises(UserError, match="no line of the training text has prompt_tokens=100 tokens"):
        teacher_prompts(LINES, tokenizer, GeneratedTextConfig(prompt_tokens=100))


def test_written_once_then_reused_until_the_teacher_or_a_setting_changes(tokenizer, tmp_path):
    teacher, path = tiny_llama(), tmp_path / TEXT_FILE
    config = GeneratedTextConfig(samples=2, prompt_tokens=6, new_tokens=5, batch_size=1)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    texts = teacher_text(teacher, tokenizer, LINES, config, path)
    assert torch.equal(torch.rand(3), expected_draw)  # the sampling left the caller's random state alone
    assert len(texts) == 2 and all(t.startswith(tokenizer.decode(p)) for t, p in
                                   zip(texts, teacher_prompts(LINES, tokenizer, config)))
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) > 6 for t in texts)
    written = path.stat().st_mtime_ns
    # Reused: the same texts, the file untouched (batch size and `only` do not change what is written).
    same = teacher_text(teacher, tokenizer, LINES, config.model_copy(update={"batch_size": 2, "only": True}), path)
    assert same == texts and path.stat().st_mtime_ns == written
    # The same seed writes the same texts; another seed, or another teacher, writes the file again.
    assert teacher_text(teacher, tokenizer, LINES, config, tmp_path / "again.json") == texts
    other_seed = teacher_text(teacher, tokenizer, LINES, config.model_copy(update={"seed": 1}), path)
    assert other_seed != texts and json.loads(path.read_text())["texts"] == other_seed
    with torch.no_grad():
        teacher.model.norm.weight.mul_(2.0)
    assert teacher_text(teacher, tokenizer, LINES, config.model_copy(update={"seed": 1}), path) != other_seed
    for foreign in ("{not json", '{"texts": ["a user\'s own file"]}'):
        path.write_text(foreign)
        with pytest.raises(UserError, match="not a teacher-text file .* remove it to generate again"):
            teacher_text(teacher, tokenizer, LINES, config, path)
        assert path.read_text() == foreign  # refused, never overwritten


@pytest.mark.parametrize("only", [False, True])
def test_distill_trains_on_the_teacher_text_with_or_without_the_corpus(tokenizer, tmp_path, only):
    teacher, student = tiny_llama(0), tiny_llama(1)
    corpus = datasets.Dataset.from_dict({"text": LINES * 4})
    written = GeneratedTextConfig(samples=4, prompt_tokens=6, new_tokens=24, only=only)
    config = KnowledgeDistillationConfig(temperature=1.0, generated_text=written)
    data = CausalLMData(max_length=16)
    trainer = distill(teacher, student, tokenizer, corpus, config, training_args(tmp_path / "o"), data=data,
                      task="causal-lm", work_dir=tmp_path / "w")
    texts = json.loads((tmp_path / "w" / TEXT_FILE).read_text())["texts"]  # (shared_dir defaults to work_dir)
    assert len(texts) == 4
    def ids(lines):
        return sum(len(tokenizer(t)["input_ids"]) for t in lines if t.strip())

    # Every text (the corpus's lines, then the teacher's) joined and cut into 16-token blocks (in one map batch).
    assert len(trainer.train_dataset) == ((0 if only else ids(LINES * 4)) + ids(texts)) // 16
    assert trainer.state.global_step == 2


def test_refused_for_a_classifier_before_any_work(tokenizer, tmp_path):
    teacher = tiny_bert(layers=2)
    student, _ = student_from_teacher(teacher, layers=[0])
    config = KnowledgeDistillationConfig(generated_text=GeneratedTextConfig())
    with pytest.raises(DistillationSettingError, match="generated_text: distillation on teacher-written text does "
                       "not support the text-classification task: the teacher continues prompts") as err:
        distill(teacher, student, tokenizer, rows(), config, training_args(tmp_path / "o"), data=DATA)
    assert err.value.key == "generated_text" and not (tmp_path / "o").exists()
