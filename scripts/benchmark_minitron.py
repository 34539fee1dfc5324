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

Usage: python scripts/benchmark_minitron.py recipes/smollm2/minitron.yaml --heads 6 --hidden 448
           [--output-dir benchmarks/smollm2/minitron]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a recipe with a minitron stage (its target_params and calibration settings)")
    parser.add_argument("--heads", type=int, required=True, help="query heads per layer of the width shapes")
    parser.add_argument("--hidden", type=int, required=True, help="hidden size of the 'width with hidden' shape")
    parser.add_argument("--output-dir", default="benchmarks/smollm2/minitron")
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
    from hf_modelopt.prune.minitron.search import format_search_table, search_shape, shapes_within_budget
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

    def pruned(name: str, shape: dict) -> dict:
        model, started = copy.deepcopy(teacher), time.perf_counter()
        shape = resolve_shape(model, shape)
        apply_plan_(model, choose_plan(model, importance, shape, stage.depth_importance))
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
    candidates = shapes_within_budget(teacher, budget, counted, stage.search_candidates)
    best, search = search_shape(teacher, importance, batches, candidates, stage.depth_importance, counted)
    search_seconds = time.perf_counter() - started
    rows.append(pruned(f"search best (of {len(search)})", {key: best[key] for key in full}))

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


if __name__ == "__main__":
    main()
