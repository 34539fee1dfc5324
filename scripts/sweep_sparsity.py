#!/usr/bin/env python
"""Accuracy against sparsity: run a pruning recipe at several sparsities and plot the result.

Each sparsity is a normal run of the recipe with `--set stages.N.sparsity=S` (N: the `prune` stage), into
OUTPUT/sparsity-S; stages before the pruning (the teacher) are reused from the stage cache. Writes
OUTPUT/sweep.json, OUTPUT/sweep.md and OUTPUT/sweep.png (metric of the last evaluate stage vs sparsity,
with the first evaluate stage, the unpruned model, as a reference line).

Usage: python scripts/sweep_sparsity.py recipes/sst2-minilm/gmp-90.yaml --sparsities 0.5 0.7 0.8 0.9 \
           --output-dir sweep [--set stages.2.training.max_steps=350 ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override applied to every run (repeatable), as in `hf-modelopt run --set`")
    args = parser.parse_args()

    from hf_modelopt.pipeline import run_recipe
    from hf_modelopt.recipe import load_recipe

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    index = next(i for i, s in enumerate(load_recipe(args.recipe).resolved_stages) if s.type == "prune")
    rows = []
    for sparsity in args.sparsities:
        recipe = load_recipe(args.recipe, overrides=[*args.overrides, f"stages.{index}.sparsity={sparsity}"])
        result = run_recipe(recipe, output / f"sparsity-{sparsity}")
        evaluations = result["metrics"]
        prune = next(r for r in result["stages"] if r["type"] == "prune")
        rows.append({"sparsity": sparsity, "measured_sparsity": prune["metrics"]["sparsity"],
                     "reference": evaluations[0]["metrics"][args.metric],
                     args.metric: evaluations[-1]["metrics"][args.metric]})
        print(rows[-1], flush=True)
        (output / "sweep.json").write_text(json.dumps({"recipe": args.recipe, "results": rows}, indent=2))

    reference = rows[0]["reference"]
    lines = [f"| target sparsity | measured | {args.metric} | % of unpruned ({reference:.4f}) |", "|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.2f} | {r['measured_sparsity']:.4f} | {r[args.metric]:.4f} | "
              f"{100 * r[args.metric] / reference:.1f} % |" for r in rows]
    (output / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot([r["measured_sparsity"] * 100 for r in rows], [r[args.metric] for r in rows], "o-", label="pruned")
    axis.axhline(reference, color="gray", linestyle="--", label="unpruned")
    axis.set_xlabel("sparsity of the pruned Linear weights (%)")
    axis.set_ylabel(args.metric)
    axis.set_title(Path(args.recipe).name)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output / "sweep.png", dpi=120)


if __name__ == "__main__":
    main()
