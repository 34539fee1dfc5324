#!/usr/bin/env python
"""One-shot pruning methods side by side on one causal LM, in one process, on the same data.

Loads the recipe's model and data once, then for each method × pattern prunes a fresh copy of the dense
model with the recipe's `prune_oneshot` settings (calibration samples, targets) and measures perplexity
on the recipe's evaluation text. Prints a Markdown table; `--json` also writes the figures.

Usage: python scripts/benchmark_oneshot.py recipes/smollm2/wanda-50.yaml
           [--methods magnitude wanda sparsegpt] [--patterns unstructured 2:4]
"""

from __future__ import annotations

import argparse
import copy
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--patterns", nargs="+", default=["unstructured"])
    parser.add_argument("--sparsity", type=float, help="default: the recipe's prune_oneshot sparsity")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    from hf_modelopt.data import load_split
    from hf_modelopt.pipeline import preflight
    from hf_modelopt.prune.masks import prunable_linears, sparsity_of
    from hf_modelopt.prune.oneshot import calibration_batches, prune_oneshot_
    from hf_modelopt.recipe import load_recipe
    from hf_modelopt.stages import ModelState, ensure_loaded
    from hf_modelopt.tasks.causal_lm import eval_token_ids, evaluate_perplexity, tokenize_causal_lm

    recipe = load_recipe(args.recipe)
    preflight(recipe)
    stage = next(s.config for s in recipe.resolved_stages if s.type == "prune_oneshot")
    sparsity = args.sparsity if args.sparsity is not None else stage.sparsity
    state = ensure_loaded(ModelState(), recipe)
    dense, tokenizer, data = state.model, state.tokenizer, recipe.data
    ids = eval_token_ids(load_split(data, "eval"), tokenizer, data)
    blocks = tokenize_causal_lm(load_split(data, "train"), tokenizer, data)

    def perplexity(model) -> float:
        return evaluate_perplexity(model, ids, data.eval_window, data.eval_batch_size)["perplexity"]

    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "perplexity": perplexity(dense), "seconds": 0.0}]
    for pattern in args.patterns:
        for method in args.methods:
            model = copy.deepcopy(dense)
            started = time.perf_counter()
            prune_oneshot_(model, calibration_batches(blocks, stage.calibration_samples), method, sparsity, pattern,
                           stage.targets, stage.exclude, stage.block_size, stage.dampening)
            seconds = time.perf_counter() - started
            rows.append({"method": method, "pattern": pattern, "sparsity": sparsity_of(prunable_linears(model)),
                         "perplexity": perplexity(model), "seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
            del model

    print(f"\n{recipe.model.name_or_path}: perplexity on {len(ids)} evaluation tokens "
          f"({data.eval_window}-token windows), {stage.calibration_samples} calibration sequences of "
          f"{data.max_length} tokens\n")
    print("| method | pattern | sparsity | perplexity | pruning time (s) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['pattern']} | {row['sparsity']:.3f} | {row['perplexity']:.2f} | "
              f"{row['seconds']} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"recipe": args.recipe, "eval_tokens": len(ids), "results": rows}, file, indent=2)


if __name__ == "__main__":
    main()
