#!/usr/bin/env python
"""Minitron pruning of one causal LM to one parameter budget, four ways, before any recovery training.

Loads the recipe's model and data once, scores the model once (activation importance on the `minitron` stage's
calibration blocks), then prunes a fresh copy of it to each of:

- depth only: the most blocks that fit the budget;
- width only: FFN neurons and query heads (`--heads` per layer; the FFN as wide as fits, a multiple of 8);
- width with hidden size: as width only, with `--hidden` embedding channels;
- the budget search's best (`target_params`: the `search_candidates` largest grid shapes, lowest calibration loss),

and measures each one's perplexity on the recipe's evaluation windows (those of the `evaluate` stage) against
the unpruned model's. Writes `minitron.json` and `minitron.md` into `--output-dir`.

With `--kd-steps N`, then trains each of the four by KD from the unpruned model for N steps (the stage's
`distillation:` loss and `training:`, with max_steps N and the live teacher), plus the search's best trained by
cross-entropy alone and, with `--distill-recipe`, that recipe's `distill` student with its own loss: every one on
the same training blocks, the same number of tokens. Held-out perplexity every `--curve-every` steps; writes
`minitron-kd.json`, `minitron-kd.md` and the curves `minitron-kd.png`.

Usage: python scripts/benchmark_minitron.py recipes/smollm2/minitron.yaml --heads 6 --hidden 448
           [--output-dir benchmarks/smollm2/minitron]
           [--kd-steps 100 --curve-every 20 --distill-recipe recipes/smollm2/distill.yaml]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

WIDTH_MULTIPLE = 8  # FFN widths tried: multiples of this (as the search's grid)


def widest_ffn(count, shape: dict, budget: int) -> int:
    """The largest FFN width (a multiple of WIDTH_MULTIPLE) that keeps `shape` within `budget` parameters."""
    for width in range(shape["intermediate_size"] // WIDTH_MULTIPLE * WIDTH_MULTIPLE, 0, -WIDTH_MULTIPLE):
        if count({**shape, "intermediate_size": width}) <= budget:
            return width
    raise SystemExit(f"no FFN width fits {budget} parameters at {shape}")


def deepest(count, shape: dict, budget: int) -> int:
    """The most blocks that keep `shape` within `budget` parameters."""
    for layers in range(shape["num_hidden_layers"], 0, -1):
        if count({**shape, "num_hidden_layers": layers}) <= budget:
            return layers
    raise SystemExit(f"not even one block of {shape} fits {budget} parameters")


def markdown(result: dict) -> str:
    setup = result["setup"]
    lines = [f"# Minitron pruning of {setup['model']} to ≤ {setup['budget']:,} {setup['counted']} parameters, "
             "before recovery", "",
             f"Calibration: {setup['calibration_tokens']:,} tokens ({setup['calibration']}); perplexity on "
             f"{setup['eval']}. Importance scored once in {setup['importance_seconds']:.0f} s; "
             f"{setup['torch_threads']} torch threads.", "",
             "| model | layers | hidden | FFN | heads / kv | parameters | calibration LM loss | perplexity | "
             "× teacher |", "|---|---|---|---|---|---|---|---|---|"]
    teacher = result["rows"][0]["perplexity"]
    for row in result["rows"]:
        s, ppl = row["shape"], row["perplexity"]
        lines.append(f"| {row['name']} | {s['num_hidden_layers']} | {s['hidden_size']} | {s['intermediate_size']} | "
                     f"{s['num_attention_heads']} / {s['num_key_value_heads']} | {row['parameters']:,} | "
                     f"{row['calibration_lm_loss']:.4f} | {ppl:.2f} | {ppl / teacher:.2f}× |")
    lines += ["", "The search (each candidate pruned on a copy, scored by its calibration LM loss):", "", "```",
              result["search_table"], "```", "", "Per-block importance:", "", "```", result["importance_table"], "```"]
    return "\n".join(lines) + "\n"


def kd_markdown(result: dict) -> str:
    setup = result["setup"]
    lines = [f"# KD recovery at the same training tokens: {setup['model']}, ≤ {setup['budget']:,} {setup['counted']} "
             "parameters", "",
             f"{setup['kd_steps']} steps × {setup['tokens_per_step']:,} tokens = {setup['kd_tokens']:,} training "
             f"tokens each, learning rate {setup['learning_rate']:g}; held-out perplexity on {setup['eval']}; "
             f"{setup['torch_threads']} torch threads. Teacher: {setup['teacher_perplexity']:.2f}.", "",
             "| model | loss | parameters | perplexity before | after | × teacher | minutes |",
             "|---|---|---|---|---|---|---|"]
    teacher = setup["teacher_perplexity"]
    for row in result["rows"]:
        lines.append(f"| {row['name']} | {row['loss']} | {row['parameters']:,} | {row['perplexity_before']:.2f} | "
                     f"{row['perplexity_after']:.2f} | {row['perplexity_after'] / teacher:.2f}× | "
                     f"{row['seconds'] / 60:.1f} |")
    lines += ["", "Held-out perplexity against training tokens:", "", "| tokens | "
              + " | ".join(row["name"] for row in result["rows"]) + " |", "|---" * (len(result["rows"]) + 1) + "|"]
    for i, point in enumerate(result["rows"][0]["curve"]):
        lines.append(f"| {point['tokens_trained']:,} | " + " | ".join(
            f"{row['curve'][i]['held_out_perplexity']:.2f}" for row in result["rows"]) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(result: dict, target: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 4.2), layout="tight")
    axes = figure.subplots()
    for row in result["rows"]:
        axes.plot([p["tokens_trained"] for p in row["curve"]], [p["held_out_perplexity"] for p in row["curve"]],
                  marker=".", label=f"{row['name']} ({row['loss']})")
    axes.axhline(result["setup"]["teacher_perplexity"], color="black", linestyle="--", label="teacher")
    axes.set(title="Held-out perplexity against training tokens", xlabel="training tokens",
             ylabel="held-out perplexity", yscale="log")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    figure.savefig(target, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a recipe with a minitron stage (its target_params and calibration settings)")
    parser.add_argument("--heads", type=int, required=True, help="query heads per layer of the width shapes")
    parser.add_argument("--hidden", type=int, required=True, help="hidden size of the 'width with hidden' shape")
    parser.add_argument("--output-dir", default="benchmarks/smollm2/minitron")
    parser.add_argument("--kd-steps", type=int, default=0, help="then train every shape this many steps (see above)")
    parser.add_argument("--curve-every", type=int, default=20, help="held-out perplexity every N training steps")
    parser.add_argument("--distill-recipe", help="a recipe whose distill stage's student joins the KD comparison")
    args = parser.parse_args()

    import torch

    from hf_modelopt.data import load_split
    from hf_modelopt.pipeline import preflight
    from hf_modelopt.prune.minitron import (
        activation_importance,
        apply_plan_,
        calibration_lm_loss,
        choose_plan,
        current_shape,
        parameters_of,
    )
    from hf_modelopt.prune.minitron.removal import resolve_shape
    from hf_modelopt.prune.minitron.search import format_search_table, search_shape, target_shapes
    from hf_modelopt.prune.structured import parameter_count
    from hf_modelopt.recipe import load_recipe
    from hf_modelopt.stages import ModelState, ensure_loaded
    from hf_modelopt.stages.minitron import calibration_loader
    from hf_modelopt.tasks.causal_lm import eval_token_ids, evaluate_perplexity

    recipe = load_recipe(args.recipe)
    preflight(recipe)
    stage = next(s.config for s in recipe.resolved_stages if s.type == "minitron")
    if stage.target_params is None:
        raise SystemExit(f"{args.recipe}: the minitron stage needs target_params (the budget compared here)")
    budget, counted = stage.target_params, stage.target_params_counted
    state = ensure_loaded(ModelState(), recipe)
    teacher, tokenizer, data = state.model.eval(), state.tokenizer, recipe.data
    eval_ids = eval_token_ids(load_split(data, "eval"), tokenizer, data)
    batches, length = calibration_loader(recipe, tokenizer, stage)

    started = time.perf_counter()
    importance = activation_importance(teacher, batches)
    importance_seconds = time.perf_counter() - started
    print(importance.table(), flush=True)

    def measured(name: str, model, shape: dict, seconds: float) -> dict:
        row = {"name": name, "shape": shape, "parameters": parameter_count(model),
               "calibration_lm_loss": calibration_lm_loss(model, batches)[0],
               "perplexity": evaluate_perplexity(model, eval_ids, data.eval_window, data.eval_batch_size)["perplexity"],
               "prune_seconds": round(seconds, 1)}
        print(json.dumps(row), flush=True)
        return row

    def pruned_copy(shape: dict):
        model = copy.deepcopy(teacher).requires_grad_(True)  # (distill() freezes the teacher it is given)
        apply_plan_(model, choose_plan(model, importance, resolve_shape(model, shape), stage.depth_importance))
        return model

    def pruned(name: str, shape: dict) -> dict:
        started = time.perf_counter()
        model = pruned_copy(shape)
        row = measured(name, model, current_shape(model), time.perf_counter() - started)
        del model
        return row

    count = parameters_of(teacher, counted)
    full = current_shape(teacher)
    group = full["num_attention_heads"] // full["num_key_value_heads"]
    if args.heads % full["num_key_value_heads"] or args.heads // full["num_key_value_heads"] > group:
        raise SystemExit(f"--heads {args.heads}: give a multiple of the {full['num_key_value_heads']} key/value "
                         f"heads, at most {full['num_attention_heads']}")
    heads = {"num_attention_heads": args.heads, "num_key_value_heads": full["num_key_value_heads"]}
    width = {**full, **heads}
    with_hidden = {**width, "hidden_size": args.hidden}
    shapes = {
        "depth only": {"num_hidden_layers": deepest(count, full, budget)},
        "width only (FFN + heads)": {**heads, "intermediate_size": widest_ffn(count, width, budget)},
        "width with hidden size": {**heads, "hidden_size": args.hidden,
                                   "intermediate_size": widest_ffn(count, with_hidden, budget)},
    }
    rows = [measured("teacher (unpruned)", teacher, full, 0.0)]
    rows += [pruned(name, shape) for name, shape in shapes.items()]
    started = time.perf_counter()
    candidates = target_shapes(teacher, stage)  # (the stage has target_params: checked above)
    best, search = search_shape(teacher, importance, batches, candidates, stage.depth_importance, counted)
    search_seconds = time.perf_counter() - started
    shapes[f"search best (of {len(search)})"] = {key: best[key] for key in full}
    rows.append(pruned(f"search best (of {len(search)})", shapes[f"search best (of {len(search)})"]))

    setup = {"model": recipe.model.name_or_path + (f" ({recipe.model.gguf_file})" if recipe.model.gguf_file else ""),
             "recipe": args.recipe, "budget": budget, "counted": counted,
             "calibration": f"{len(batches)} batches of {stage.calibration_batch_size} × {length}-token blocks from "
                            f"the start of the training split",
             "calibration_tokens": importance.tokens,
             "eval": f"{len(eval_ids):,} held-out tokens in {data.eval_window}-token windows (the evaluate stage's)",
             "depth_importance": stage.depth_importance, "importance_seconds": round(importance_seconds, 1),
             "search_seconds": round(search_seconds, 1), "torch_threads": torch.get_num_threads()}
    result = {"setup": setup, "rows": rows, "search": search, "search_table": format_search_table(search, counted),
              "importance_table": importance.table()}
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "minitron.json").write_text(json.dumps(result, indent=2))
    (output / "minitron.md").write_text(markdown(result))
    print(markdown(result))
    if args.kd_steps:
        kd_comparison(args, recipe, stage, teacher, tokenizer, eval_ids, shapes, pruned_copy, result)


def kd_comparison(args, recipe, stage, teacher, tokenizer, eval_ids, shapes: dict, pruned_copy, before: dict) -> None:
    """Every shape (and the CE-only and distill-recipe references) trained for the same steps; see the docstring."""
    import torch

    from hf_modelopt.data import load_split
    from hf_modelopt.distill import KnowledgeDistillationConfig, student_from_teacher
    from hf_modelopt.distill.distill import distill
    from hf_modelopt.prune.minitron import current_shape
    from hf_modelopt.prune.structured import parameter_count
    from hf_modelopt.recipe import load_recipe
    from hf_modelopt.stages.train import training_arguments
    from hf_modelopt.tasks.held_out import HeldOutPerplexityCallback, perplexity_curve, tokens_trained

    if stage.distillation is None:
        raise SystemExit(f"{args.recipe}: --kd-steps needs the minitron stage's distillation: (the KD loss compared)")
    data, output = recipe.data, Path(args.output_dir)
    train_rows = load_split(data, "train")
    training = {**stage.training, "max_steps": args.kd_steps, "save_strategy": "no", "report_to": []}
    kd = stage.distillation.model_copy(update={"cache_teacher_logits": False})  # (the same logits, live)
    ce_only = KnowledgeDistillationConfig(kd_weight=0.0, ce_weight=1.0)

    def describe(loss) -> str:
        terms = [f"{weight} {name}" for name, weight in (("KD", loss.kd_weight), ("CE", loss.ce_weight)) if weight]
        return " + ".join(terms) + (f", top-{loss.top_k}" if loss.kd_weight and loss.top_k else "")

    def recovered(name: str, model, loss, copied_from=None) -> dict:
        folder = output / "kd-runs" / "".join(c if c.isalnum() else "-" for c in name)
        training_args = training_arguments(recipe, training, folder)
        curve_callback = HeldOutPerplexityCallback(eval_ids, data.eval_window, data.eval_batch_size, args.curve_every,
                                                   data.max_length)
        started = time.perf_counter()
        trainer = distill(teacher, model, tokenizer, train_rows, loss, training_args, task=recipe.task, data=data,
                          copied_from=copied_from, work_dir=folder, callbacks=[curve_callback])
        curve = perplexity_curve(trainer.state.log_history)
        row = {"name": name, "loss": describe(loss), "shape": current_shape(trainer.model),
               "parameters": parameter_count(trainer.model), "kd_tokens": curve[-1]["tokens_trained"],
               "perplexity_before": curve[0]["held_out_perplexity"],
               "perplexity_after": curve[-1]["held_out_perplexity"],
               "seconds": round(time.perf_counter() - started, 1), "curve": curve,
               "train_log": [e for e in trainer.state.log_history if "loss" in e]}
        print(json.dumps({k: v for k, v in row.items() if k not in ("curve", "train_log")}), flush=True)
        return row

    rows = [recovered(name, pruned_copy(shape), kd) for name, shape in shapes.items()]
    best = list(shapes)[-1]
    rows.append(recovered(f"{best}, CE only", pruned_copy(shapes[best]), ce_only))
    if args.distill_recipe:
        reference = next(s.config for s in load_recipe(args.distill_recipe).resolved_stages if s.type == "distill")
        student, copied_from = student_from_teacher(teacher, reference.student.layers, reference.student.every)
        fields = KnowledgeDistillationConfig.model_fields
        loss = KnowledgeDistillationConfig(**{key: getattr(reference, key) for key in fields})
        rows.append(recovered(f"{Path(args.distill_recipe).name} student", student.requires_grad_(True),
                              loss.model_copy(update={"cache_teacher_logits": False}), copied_from))

    probe = training_arguments(recipe, training, output / "kd-runs")
    setup = {**before["setup"], "kd_steps": args.kd_steps, "curve_every": args.curve_every,
             "tokens_per_step": tokens_trained(probe, 1, data.max_length),
             "kd_tokens": tokens_trained(probe, args.kd_steps, data.max_length),
             "learning_rate": probe.learning_rate, "teacher_perplexity": before["rows"][0]["perplexity"],
             "distill_recipe": args.distill_recipe, "torch_threads": torch.get_num_threads()}
    result = {"setup": setup, "rows": rows}
    (output / "minitron-kd.json").write_text(json.dumps(result, indent=2))
    (output / "minitron-kd.md").write_text(kd_markdown(result))
    plot_curves(result, output / "minitron-kd.png")
    print(kd_markdown(result))


if __name__ == "__main__":
    main()
