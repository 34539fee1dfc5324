"""The seq2seq task (T5 / BART): training rows, generation metrics, per-decoder-token KD and one recipe through
every stage."""

import json
import math
import random

import pytest
import torch

from hf_modelopt.compat import UnsupportedModelError
from hf_modelopt.distill.losses import soft_target_kl
from hf_modelopt.export.save import EXPORT_RECORD
from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import validate_recipe
from hf_modelopt.tasks import Seq2SeqData, get_task
from hf_modelopt.tasks.seq2seq import decoder_inputs_from_labels, generation_metrics, tokenize_seq2seq

from .. import conftest
from ..conftest import tiny_recipe

WORDS = "red green blue cat dog sun moon tree river stone bird fish".split()
# 64 features in and out (and 128 in the FFN): bitsandbytes' 4-bit CPU kernels take these shapes.
WIDE_SEQ2SEQ = {
    "t5": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
               decoder_start_token_id=0),
    "bart": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256),
}


@pytest.fixture(scope="module")
def wide_seq2seq(tmp_path_factory):
    """`wide_seq2seq(model_type)` -> folder of a tiny random T5 / BART with 64-wide layers (built once)."""
    built = {}

    def get(model_type: str):
        if model_type not in built:
            original = conftest.TINY_CONFIGS[model_type]
            conftest.TINY_CONFIGS[model_type] = WIDE_SEQ2SEQ[model_type]
            try:
                folder = tmp_path_factory.mktemp(f"wide-{model_type}-seq2seq")
                built[model_type] = conftest.build_tiny_model(model_type, "seq2seq", folder)
            finally:
                conftest.TINY_CONFIGS[model_type] = original
        return built[model_type]

    return get


@pytest.fixture
def copy_files(tmp_path):
    """"copy" pairs: the target is the source's words; 32 training and 8 evaluation rows (JSON lines)."""
    rng = random.Random(0)
    folder = tmp_path / "copy"
    folder.mkdir()
    for name, rows in (("train.jsonl", 32), ("eval.jsonl", 8)):
        lines = []
        for _ in range(rows):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
            lines.append(json.dumps({"text": words, "target": words}))
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def test_training_rows_have_prefixed_sources_and_labels_padded_with_minus_100(tiny_models):
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models("t5", "seq2seq"))
    config = Seq2SeqData(source_prefix="copy: ", max_length=8, max_target_length=4)
    rows = datasets.Dataset.from_dict({"text": ["red green", "a b c d e f g h"], "target": ["red", "w x y z q"]})
    encoded = tokenize_seq2seq(rows, tokenizer, config)
    assert encoded.column_names == ["input_ids", "attention_mask", "labels"]  # no token_type_ids: T5 refuses them
    assert tokenizer.decode(encoded[0]["input_ids"], skip_special_tokens=True) == "copy : red green"
    assert len(encoded[1]["input_ids"]) == 8 and len(encoded[1]["labels"]) == 4  # each cut to its own length
    batch = get_task("seq2seq").collator(tokenizer)([encoded[0], encoded[1]])
    short = len(tokenizer(text_target="red")["input_ids"])
    assert batch["labels"].shape == (2, 4)
    assert batch["labels"][0, short:].tolist() == [-100] * (4 - short)  # label padding: ignored by every loss
    assert batch["labels"][1].ne(-100).all() and batch["attention_mask"][0].tolist()[-1] == 0

    config_of_t5 = type("Config", (), {"decoder_start_token_id": 7, "pad_token_id": 0, "model_type": "t5"})
    shifted = decoder_inputs_from_labels(batch["labels"], config_of_t5)
    assert shifted[:, 0].tolist() == [7, 7] and shifted[1, 1:].tolist() == batch["labels"][1, :-1].tolist()
    assert (shifted >= 0).all()  # -100 became the pad token


def test_rouge_and_bleu_of_hand_made_examples():
    same = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["rouge1"] == same["rouge2"] == same["rougeL"] == pytest.approx(1.0)
    assert same["bleu"] == pytest.approx(100.0)
    # Prediction "the cat ran", reference "the cat sat down": 2 shared words; precision 2/3, recall 2/4,
    # F = 2PR/(P+R) = 4/7. Bigrams: "the cat" shared of 2 and 3: F = 2(1/2)(1/3)/(1/2+1/3) = 2/5.
    partial = generation_metrics(["the cat ran"], ["the cat sat down"])
    assert partial["rouge1"] == pytest.approx(4 / 7) and partial["rouge2"] == pytest.approx(2 / 5)
    assert partial["rougeL"] == pytest.approx(4 / 7)
    assert partial["bleu"] == 0.0  # no shared 3-gram: corpus BLEU is 0
    # Every n-gram of the prediction is in the 7-word reference: BLEU is the brevity penalty exp(1 - 7/6).
    shorter = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat now"])
    assert shorter["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 6), rel=1e-4)
    assert shorter["rouge1"] == pytest.approx(12 / 13)  # P = 1, R = 6/7
    averaged = generation_metrics(["the cat ran", "x y"], ["the cat sat down", "x y"])
    assert averaged["rouge1"] == pytest.approx((4 / 7 + 1) / 2)  # a mean over examples


def test_seq2seq_kd_compares_each_decoder_position_unshifted_over_labelled_positions(tiny_models):
    import copy

    from transformers import AutoModelForSeq2SeqLM, TrainingArguments

    from hf_modelopt.distill.config import DistillationConfig
    from hf_modelopt.distill.trainer import DistillationTrainer

    labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    student_logits = torch.randn(2, 4, 11)
    teacher_logits = student_logits.clone()
    teacher_logits[labels == -100] = torch.randn(3, 11) * 5  # differs only where there is no label
    assert soft_target_kl(student_logits, teacher_logits, 2.0, mask=labels != -100) == pytest.approx(0.0, abs=1e-6)
    assert soft_target_kl(student_logits, teacher_logits, 2.0) > 0.1  # unmasked, the padding would count

    student = AutoModelForSeq2SeqLM.from_pretrained(tiny_models("t5", "seq2seq"))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.lm_head.weight.add_(torch.randn_like(teacher.lm_head.weight))  # (T5 ties lm_head to shared)
    batch = {"input_ids": torch.tensor([[101, 2417, 102], [101, 2665, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "labels": labels}
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    config = DistillationConfig(temperature=2.0)
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation=config, args=args, task="seq2seq")
    loss = trainer.compute_loss(student, batch)
    decoder = {"decoder_input_ids": decoder_inputs_from_labels(labels, student.config)}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **decoder}
    with torch.no_grad():
        expected = soft_target_kl(student(**inputs).logits, teacher(**inputs).logits, 2.0, mask=labels != -100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and expected > 0
    same = DistillationTrainer(model=student, teacher=copy.deepcopy(student), distillation=config, args=args)
    assert same.task.name == "seq2seq" and same.compute_loss(student, batch).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UnsupportedModelError, match="distillation of hidden states does not support the seq2seq "
                                                    "task: it compares one stack of layers"):
        DistillationTrainer(model=student, teacher=teacher, args=args,
                            distillation=DistillationConfig(hidden_weight=1.0))


def test_evaluate_model_generates_for_raw_rows(tiny_models):
    import datasets
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_modelopt.metrics import evaluate_model

    folder = tiny_models("t5", "seq2seq")
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    rows = datasets.Dataset.from_dict({"text": ["red green", "blue", "cat dog sun"], "target": ["a", "b", "c"]})
    metrics = evaluate_model(model, tokenizer, rows, config=Seq2SeqData(max_target_length=4, eval_batch_size=2))
    assert set(metrics) == {"rouge1", "rouge2", "rougeL", "bleu", "eval_samples"} and metrics["eval_samples"] == 3


def test_what_seq2seq_cannot_do_is_refused_before_any_work(tiny_models, sst2_files, copy_files, tmp_path):
    from hf_modelopt.errors import UserError

    stages = [{"type": "distill", "student": {"layers": [0], "decoder_layers": [0]}}]
    with pytest.raises(UserError, match="distill.student.decoder_layers: .* 'bert' model without a decoder stack"):
        run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)), tmp_path / "o")
    t5 = tiny_models("t5", "seq2seq")
    refused = {
        "distill.student.decoder_layers: \\[2\\] out of range: the teacher's decoder has layers 0..1":
            [{"type": "distill", "student": {"decoder_layers": [0, 2]}}],
        "distill.hidden_weight: distillation of hidden states does not support the seq2seq task: it compares one "
        "stack of layers":
            [{"type": "distill", "student": {"every": 2}, "hidden_weight": 1.0}],
        "distill.cache_teacher_logits: teacher logit cache does not support the seq2seq task: the cache is cut to "
        "the encoder's input length":
            [{"type": "distill", "student": {"every": 2}, "cache_teacher_logits": True}],
        "stages\\[0\\].sensitivity: quantization with calibration does not support the seq2seq task: .* without "
        "decoder inputs":
            [{"type": "quantize", "sensitivity": {"keep_fraction": 0.5}}],
        "prune_oneshot: one-shot pruning does not support the seq2seq task: .* an encoder-decoder":
            [{"type": "prune_oneshot"}],
    }
    for message, stages in refused.items():
        with pytest.raises(UserError, match=message):
            run_recipe(validate_recipe(seq2seq_recipe(t5, copy_files, stages)), tmp_path / "o")
    missing_target = seq2seq_recipe(t5, copy_files, ["finetune"])
    missing_target["data"]["target_column"] = "summary"
    with pytest.raises(UserError, match="data.target_column: column 'summary' not found in .*train.jsonl"):
        run_recipe(validate_recipe(missing_target), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def seq2seq_recipe(model, data, stages) -> dict:
    recipe = tiny_recipe(model, data, stages=stages)
    recipe.update(task="seq2seq", data={"data_dir": str(data), "train_file": "train.jsonl",
                                        "eval_file": "eval.jsonl", "source_prefix": "copy: ", "max_length": 16,
                                        "max_target_length": 8, "eval_batch_size": 8})
    return recipe


# BART runs the same recipe in the slow suite: both together exceed this file's 90 s share of the default suite.
@pytest.mark.parametrize("model_type", ["t5", pytest.param("bart", marks=pytest.mark.slow)])
def test_seq2seq_recipe_through_every_stage(model_type, wide_seq2seq, copy_files, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    stages = [{"type": "evaluate", "name": "before"},
              {"type": "finetune"},
              {"type": "distill", "student": {"every": 1, "decoder_layers": [1]}, "ce_weight": 0.5},
              {"type": "prune", "sparsity": 0.5, "schedule": {"end_step": 2, "update_every": 1},
               "distillation": {"ce_weight": 0.5}},
              # (the export reloads the quantized folder in a fresh process: one reload check, not two)
              {"type": "quantize", "method": "nf4", "verify": False},
              {"type": "evaluate", "name": "after"},
              {"type": "export", "compare_base": False, "latency_repeats": 0}]
    result = run_recipe(validate_recipe(seq2seq_recipe(wide_seq2seq(model_type), copy_files, stages)),
                        tmp_path / "o")
    before, after = (record["metrics"] for record in result["metrics"])
    for metrics in (before, after):
        assert set(metrics) >= {"rouge1", "rouge2", "rougeL", "bleu"} and metrics["eval_samples"] == 8
    out = tmp_path / "o"
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    decoder = model.model.decoder.layers if model_type == "bart" else model.decoder.block
    assert len(decoder) == 1  # decoder_layers: [1]; the encoder kept both layers
    assert model.config.num_hidden_layers == 2
    quantized = [name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"]
    assert quantized, "no layer was quantized to 4 bits"
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["reload_check"]["passed"] and record["reload_check"]["max_abs_diff"] <= 1e-4
    assert record["metrics"] == pytest.approx(after)  # the fresh process generates what the run did
    assert "text2text-generation" in (out / "README.md").read_text()


def test_latency_batch_of_an_encoder_decoder_has_decoder_inputs(tiny_models):
    from transformers import AutoModelForSeq2SeqLM

    from hf_modelopt.export.measure import compare_latency

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models("bart", "seq2seq"))
    timing = compare_latency({"bart": model}, batch_size=2, seq_len=4, repeats=1, warmup=0)
    assert timing["bart"]["latency_ms"] > 0
