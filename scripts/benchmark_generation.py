#!/usr/bin/env python
"""Greedy-generation throughput of a compressed causal LM against the model it was made from, side by side in one
process (interleaved, median of `--repeats`), at several batch sizes.

The baseline is the recipe's model, loaded as the recipe loads it (e.g. SmolLM2 from its GGUF file, fp32); the
compressed model is an exported folder, loaded with plain `from_pretrained`. Prompts: the first `--prompt-tokens`
tokens of consecutive held-out windows of the recipe's evaluation text (every prompt the same length: no padding).
Each call generates exactly `--new-tokens` tokens (greedy, KV cache on); throughput = batch x new tokens / seconds.
Writes `generation.json` and `generation.md` into `--output-dir`.

Usage: python scripts/benchmark_generation.py recipes/smollm2/minitron.yaml OUT/ [--batch-sizes 1 8]
           [--new-tokens 128] [--output-dir benchmarks/smollm2/minitron]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def markdown(result: dict) -> str:
    setup = result["setup"]
    lines = [f"# Greedy generation on CPU: {setup['model']} against {setup['baseline']}", "",
             f"{setup['new_tokens']} new tokens per sequence after a {setup['prompt_tokens']}-token prompt, greedy, KV "
             f"cache; median of {setup['repeats']} interleaved runs after one warm-up each; {setup['torch_threads']} "
             f"torch threads; {setup['dtype']}.", "",
             "| batch | baseline s | baseline tokens/s | model s | model tokens/s | speed-up |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['batch_size']} | {row['baseline_seconds']:.2f} | "
                     f"{row['baseline_tokens_per_second']:.1f} | {row['model_seconds']:.2f} | "
                     f"{row['model_tokens_per_second']:.1f} | {row['speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="the recipe whose model is the baseline and whose evaluation text gives prompts")
    parser.add_argument("model", help="the compressed model's folder (plain from_pretrained)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", default=None, help="default: the model folder's parent")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from hf_modelopt.benchmark import interleaved_generation_seconds
    from hf_modelopt.data import load_split
    from hf_modelopt.prune.structured import parameter_count
    from hf_modelopt.recipe import load_recipe
    from hf_modelopt.stages import ModelState, ensure_loaded
    from hf_modelopt.tasks.causal_lm import eval_token_ids, eval_windows

    recipe = load_recipe(args.recipe)
    state = ensure_loaded(ModelState(), recipe)
    baseline, tokenizer = state.model.eval(), state.tokenizer
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=baseline.dtype).eval()
    ids = eval_token_ids(load_split(recipe.data, "eval"), tokenizer, recipe.data)
    prompts = [w[: args.prompt_tokens] for w in eval_windows(ids, recipe.data.eval_window)]
    if len(prompts[-1]) < args.prompt_tokens:
        prompts.pop()
    if len(prompts) < max(args.batch_sizes):
        raise SystemExit(f"the evaluation text gives {len(prompts)} prompts, fewer than batch {max(args.batch_sizes)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    rows = []
    for batch_size in args.batch_sizes:
        times = interleaved_generation_seconds({"baseline": baseline, "model": model},
                                               torch.tensor(prompts[:batch_size]), args.new_tokens, pad, args.repeats)
        row = {"batch_size": batch_size}
        for name, seconds in times.items():
            row[f"{name}_seconds"] = statistics.median(seconds)
            row[f"{name}_tokens_per_second"] = batch_size * args.new_tokens / statistics.median(seconds)
            row[f"{name}_all_seconds"] = [round(s, 3) for s in seconds]
        row["speedup"] = row["model_tokens_per_second"] / row["baseline_tokens_per_second"]
        print(json.dumps(row), flush=True)
        rows.append(row)

    setup = {"recipe": args.recipe, "model": f"{args.model} ({parameter_count(model):,} parameters)",
             "baseline": recipe.model.name_or_path + (f" ({recipe.model.gguf_file})" if recipe.model.gguf_file else "")
             + f" ({parameter_count(baseline):,} parameters)", "new_tokens": args.new_tokens,
             "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
             "dtype": str(baseline.dtype)}
    result = {"setup": setup, "rows": rows}
    output = Path(args.output_dir) if args.output_dir else Path(args.model).resolve().parent
    output.mkdir(parents=True, exist_ok=True)
    (output / "generation.json").write_text(json.dumps(result, indent=2))
    (output / "generation.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
