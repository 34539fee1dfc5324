"""examples/distill.py (a script calling `hf_modelopt.distill.distill`) and the recipe's `distill` stage train the
same student: same teacher, SST-2 rows, steps, seed, student layers, temperature, loss weights, learning rate and
batch size give the same weights, eval logits and accuracy.

Everything the two could differ in is set alike here: the seed (the script's `--seed`, the recipe's
`training.seed`), the rows (the same files and sample counts, `text_column: sentence`, `max_length`), KD's
`kd_weight` 1 (the script's fixed value), and the recipe's training defaults that matter (`save_strategy: "no"`,
`logging_steps` 50, as the script's `TrainingArguments`). The rest of the recipe's defaults change no number in one
process (checkpoint settings, `average_tokens_across_devices`, pinned memory on CPU), and `remove_unused_columns`
is off for both (`distill()` turns it off).
"""

import importlib.util

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import validate_recipe
from tests.conftest import REPO, write_small_data
from tests.examples.test_examples import tiny_bert

SEED, STEPS, BATCH, LEARNING_RATE, MAX_LENGTH, TRAIN_ROWS, EVAL_ROWS = 3, 4, 8, 1e-3, 64, 48, 24
LOSS = {"temperature": 3.0, "kd_weight": 1.0, "ce_weight": 0.5, "hidden_weight": 0.5}


def example_main():
    spec = importlib.util.spec_from_file_location("example_distill", REPO / "examples" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def eval_logits(folder, texts):
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(texts, padding=True, truncation=True, max_length=MAX_LENGTH,
                                                  return_tensors="pt")
    with torch.inference_mode():
        return model(**batch).logits


def test_example_script_and_recipe_train_the_same_student(tmp_path):
    data = write_small_data(tmp_path / "data")  # 64 train, 32 eval rows of SST-2 (../shared/data)
    teacher = tiny_bert(tmp_path / "teacher")  # a 2-layer BERT classifier with the MiniLM tokenizer
    sst2 = data / "sst2"

    script = example_main()([
        "--model", str(teacher), "--train-file", str(sst2 / "train.tsv"), "--eval-file", str(sst2 / "validation.tsv"),
        "--output-dir", str(tmp_path / "script"), "--seed", str(SEED), "--max-steps", str(STEPS),
        "--batch-size", str(BATCH), "--learning-rate", str(LEARNING_RATE), "--layers", "1",
        "--temperature", str(LOSS["temperature"]), "--ce-weight", str(LOSS["ce_weight"]),
        "--hidden-weight", str(LOSS["hidden_weight"]), "--max-train-samples", str(TRAIN_ROWS),
        "--max-eval-samples", str(EVAL_ROWS), "--max-length", str(MAX_LENGTH)])

    recipe = {
        "description": "the example's distillation as a recipe",
        "model": {"name_or_path": str(teacher)},
        "task": "text-classification",
        "data": {"data_dir": str(data), "train_file": "sst2/train.tsv", "eval_file": "sst2/validation.tsv",
                 "text_column": "sentence", "max_length": MAX_LENGTH, "max_train_samples": TRAIN_ROWS,
                 "max_eval_samples": EVAL_ROWS},
        "training": {"max_steps": STEPS, "per_device_train_batch_size": BATCH, "learning_rate": LEARNING_RATE,
                     "seed": SEED, "save_strategy": "no", "logging_steps": 50, "report_to": "none"},
        "stages": [{"type": "distill", "student": {"layers": [1]}, **LOSS}, {"type": "evaluate"}],
    }
    result = run_recipe(validate_recipe(recipe), tmp_path / "recipe")
    recipe_student = tmp_path / "recipe" / "stages" / "distill" / "model"

    assert script["copied_from"] == [1] and script["eval_samples"] == EVAL_ROWS
    (evaluated,) = [record["metrics"] for record in result["metrics"] if record["model"].endswith("-> distill")]
    assert evaluated["eval_samples"] == EVAL_ROWS
    assert evaluated["accuracy"] == script["accuracy"] and evaluated["f1"] == script["f1"]
    weights = [AutoModelForSequenceClassification.from_pretrained(folder).state_dict()
               for folder in (tmp_path / "script", recipe_student)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], rtol=0, atol=1e-6), name
    texts = [line.split("\t")[0] for line in (sst2 / "validation.tsv").read_text().splitlines()[1:EVAL_ROWS + 1]]
    logits = [eval_logits(folder, texts) for folder in (tmp_path / "script", recipe_student)]
    assert torch.allclose(logits[0], logits[1], rtol=0, atol=1e-6)
    # Training moved the student away from its copied teacher layer: the comparison is not of two untrained copies.
    untrained = AutoModelForSequenceClassification.from_pretrained(teacher).state_dict()
    assert not torch.equal(weights[0]["bert.encoder.layer.0.output.dense.weight"],
                           untrained["bert.encoder.layer.1.output.dense.weight"])
