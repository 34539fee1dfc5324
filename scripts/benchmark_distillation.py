#!/usr/bin/env python
"""What a distillation step costs, measured side by side in one process on real SST-2 batches.

Times (median of interleaved repeats, batch 32, length <= 64):
  student step      plain Trainer step of the student (forward, CE backward, optimizer step)
  teacher forward   the teacher under torch.no_grad()
  KD step (live)    DistillationTrainer step with the teacher running
  KD step (cached)  DistillationTrainer step reading the teacher's logits from a logit cache
and the ratios the distillation issue asks for: live / (student + teacher) and cached / student.
It also reports inference latency of teacher vs student at batch 32, length 64.

Usage: python scripts/benchmark_distillation.py TEACHER_DIR [--layers 0 2 4] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", help="fine-tuned teacher folder (e.g. OUT/stages/finetune/model)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--data", default="../shared/data/sst2/train.tsv")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_modelopt.benchmark import compare_latency, format_latency_table
    from hf_modelopt.distill import DistillationConfig, student_from_teacher
    from hf_modelopt.distill.losses import top_k_logits
    from hf_modelopt.distill.trainer import DistillationTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    rows = load_dataset("csv", data_files=args.data, delimiter="\t", quoting=3, split="train")
    encoded = tokenizer(rows["sentence"][: 32 * 8], truncation=True, max_length=64)
    collate = DataCollatorWithPadding(tokenizer)
    batches = [collate([{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                         "token_type_ids": encoded["token_type_ids"][i], "labels": rows["label"][i]}
                        for i in range(start, start + 32)]) for start in range(0, 32 * 8, 32)]

    def trainer_for(cls, model, **kwargs):
        training = TrainingArguments(output_dir="/tmp/hf-modelopt-bench", report_to="none", use_cpu=True,
                                     per_device_train_batch_size=32, learning_rate=5e-5, disable_tqdm=True)
        trainer = cls(model=model, args=training, **kwargs)
        trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we bypass
        model.train()
        return trainer

    plain = trainer_for(Trainer, student_from_teacher(teacher, args.layers)[0])
    config = DistillationConfig(student={"layers": args.layers}, ce_weight=0.5)
    live = trainer_for(DistillationTrainer, student_from_teacher(teacher, args.layers)[0], teacher=teacher,
                       distillation=config)
    cached = trainer_for(DistillationTrainer, student_from_teacher(teacher, args.layers)[0], teacher=None,
                         distillation=config)
    with torch.no_grad():
        cached_logits = [top_k_logits(teacher(**{k: v for k, v in b.items() if k != "labels"}).logits, None)
                         for b in batches]

    def step(trainer, batch):
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    def teacher_forward(batch):
        with torch.no_grad():
            teacher(**{k: v for k, v in batch.items() if k != "labels"})

    def with_cache(i):
        values, indices = cached_logits[i]
        return {**batches[i], "teacher_top_values": values, "teacher_top_indices": indices}

    work = {
        "student step": lambda i: step(plain, dict(batches[i])),
        "teacher forward": lambda i: teacher_forward(batches[i]),
        "KD step (live)": lambda i: step(live, dict(batches[i])),
        "KD step (cached)": lambda i: step(cached, with_cache(i)),
    }
    timings = {name: [] for name in work}
    for round_ in range(2 + args.repeats):  # 2 warm-up rounds
        for name, run in work.items():  # interleaved: machine noise hits every variant alike
            index = round_ % len(batches)
            started = time.perf_counter()
            run(index)
            if round_ >= 2:
                timings[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) * 1000 for name, values in timings.items()}
    student_and_teacher = median["student step"] + median["teacher forward"]
    results = {
        "step_ms": median,
        "live_kd_over_student_plus_teacher": median["KD step (live)"] / student_and_teacher,
        "cached_kd_over_student": median["KD step (cached)"] / median["student step"],
        "threads": torch.get_num_threads(),
    }
    for name, value in median.items():
        print(f"{name:<18} {value:8.1f} ms")
    print(f"KD step (live) / (student step + teacher forward) = {results['live_kd_over_student_plus_teacher']:.3f}")
    print(f"KD step (cached) / student step                   = {results['cached_kd_over_student']:.3f}")

    student = student_from_teacher(teacher, args.layers)[0].eval()
    latency = compare_latency({"teacher (6 layers)": teacher, f"student (layers {args.layers})": student},
                              batch_size=32, seq_len=64, repeats=args.repeats)
    print(format_latency_table(latency))
    results["inference"] = latency
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
