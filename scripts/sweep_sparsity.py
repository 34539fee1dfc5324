#!/usr/bin/env python
"""Accuracy against sparsity: run a pruning recipe at several sparsities and plot the result.

Each sparsity is a normal run of the recipe, `hf-modelopt run RECIPE --set stages.N.sparsity=S` (N: the
`prune` stage), in its own process, into OUTPUT/sparsity-S (log: OUTPUT/sparsity-S.log); stages before the
pruning (the teacher) are reused from the stage cache. `--jobs J` runs J sparsities at once, each on its own
GPU or on its share of the CPU cores (`hf_modelopt.parallel`). Writes
OUTPUT/sweep.json, OUTPUT/sweep.md and OUTPUT/sweep.png (metric of the last evaluate stage vs sparsity,
with the first evaluate stage, the unpruned model, as a reference line).

Usage: python scripts/sweep_sparsity.py recipes/sst2-minilm/gmp-90.yaml --sparsities 0.5 0.7 0.8 0.9 \
           --output-dir sweep [--jobs 2] [--set stages.2.training.max_steps=350 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--metric", default="accuracy")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override applied to every run (repeatable), as in `hf-modelopt run --set`")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each on one GPU or a share of the cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs of the same sparsities")
    args = parser.parse_args()

    from hf_modelopt.parallel import ProcessRun, run_processes
    from hf_modelopt.recipe import load_recipe

    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe, args.overrides)  # fails early, with the bad key named
    index = next(i for i, s in enumerate(recipe.resolved_stages) if s.type == "prune")
    runs = []
    for sparsity in args.sparsities:
        command = [sys.executable, "-m", "hf_modelopt.cli", "run", args.recipe, "--output-dir",
                   str(output / f"sparsity-{sparsity}")]
        for override in [*args.overrides, f"stages.{index}.sparsity={sparsity}"]:
            command += ["--set", override]
        runs.append(ProcessRun(f"sparsity-{sparsity}", command + (["--overwrite"] if args.overwrite else []),
                          output / f"sparsity-{sparsity}.log"))
    codes = run_processes(runs, jobs=args.jobs)
    failed = [name for name, code in codes.items() if code != 0]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (see their logs in {output})")
    rows = []
    for sparsity in args.sparsities:
        run = output / f"sparsity-{sparsity}"
        evaluations = json.loads((run / "metrics.json").read_text())
        prune = json.loads((run / "stages" / recipe.resolved_stages[index].name / "stage.json").read_text())
        rows.append({"sparsity": sparsity, "measured_sparsity": prune["metrics"]["sparsity"],
                     "reference": evaluations[0]["metrics"][args.metric],
                     args.metric: evaluations[-1]["metrics"][args.metric], "prune_seconds": prune["seconds"]})
    (output / "sweep.json").write_text(json.dumps({"recipe": args.recipe, "overrides": args.overrides,
                                                   "jobs": args.jobs, "results": rows}, indent=2))

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
