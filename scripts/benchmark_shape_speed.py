#!/usr/bin/env python
"""Greedy-generation throughput of a causal LM at smaller uniform shapes, before pruning anything: what a
`minitron` stage's shape will decode at on this machine, to choose the `num_hidden_layers` held beside
`target_params`.

Each shape is the recipe model's config with its depth and widths changed (`head_dim` kept), built with random
weights: decoding speed depends on the shapes, not on the values. The config's own shape, built the same way, is
the baseline; every model generates exactly `--new-tokens` greedy tokens (KV cache on) after the same random
`--prompt-tokens`-token prompts, interleaved in one process, median of `--repeats` after one warm-up each.
Prints the table; with `--output-dir`, writes `shape-speed.json` and `shape-speed.md` there.

Usage: python scripts/benchmark_shape_speed.py recipes/smollm2/minitron.yaml 26/576/768/9/3 20/576/1152/9/3
           [--batch-sizes 1 8] [--new-tokens 128] [--repeats 3] [--output-dir DIR]
A shape is layers/hidden/ffn/heads/kv_heads (num_hidden_layers/hidden_size/intermediate_size/
num_attention_heads/num_key_value_heads).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

from hf_modelopt.prune.minitron.config import SHAPE_KEYS


def parse_shape(text: str) -> dict[str, int]:
    values = text.split("/")
    if len(values) != len(SHAPE_KEYS) or not all(v.isdigit() and int(v) > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give a shape as layers/hidden/ffn/heads/kv_heads, e.g. "
                                         "20/576/1152/9/3")
    return dict(zip(SHAPE_KEYS, map(int, values)))


def shape_name(shape: dict[str, int]) -> str:
    return "/".join(str(shape[key]) for key in SHAPE_KEYS)


def markdown(result: dict) -> str:
    setup = result["setup"]
    lines = [f"# Greedy generation at other shapes of {setup['model']} (random weights)", "",
             f"{setup['new_tokens']} new tokens per sequence after a {setup['prompt_tokens']}-token prompt, greedy, KV "
             f"cache; median of {setup['repeats']} interleaved runs after one warm-up each; {setup['torch_threads']} "
             f"torch threads; {setup['dtype']}. Shape: layers/hidden/ffn/heads/kv_heads.", "",
             "| batch | shape | parameters | seconds | tokens/s | speed-up |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['batch_size']} | {row['shape']}{' (own)' if row['own'] else ''} | "
                     f"{row['parameters']:,} | {row['seconds']:.2f} | {row['tokens_per_second']:.1f} | "
                     f"{row['speedup']:.2f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="the recipe whose model's config gives the family and the baseline shape")
    parser.add_argument("shapes", nargs="+", type=parse_shape, help="layers/hidden/ffn/heads/kv_heads")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", default=None, help="write shape-speed.json / .md here")
    args = parser.parse_args()

    import torch

    from hf_modelopt.benchmark import interleaved_generation_seconds
    from hf_modelopt.errors import UserError
    from hf_modelopt.modeling import auto_model_class
    from hf_modelopt.prune.minitron import current_shape, resolve_shape
    from hf_modelopt.prune.structured import head_geometry, parameter_count
    from hf_modelopt.recipe import load_recipe
    from hf_modelopt.stages import meta_model

    recipe = load_recipe(args.recipe)
    meta = meta_model(recipe.model, recipe.task)
    config, own = meta.config, current_shape(meta)
    config.head_dim = head_geometry(config)[2]  # explicit, so that it stays when the head count changes
    for shape in args.shapes:  # shapes pruning can reach (the same checks as the minitron stage's), before any work
        try:
            resolve_shape(meta, shape)
        except UserError as err:
            parser.error(f"{shape_name(shape)}: {err}")

    def build(shape: dict[str, int]):
        shaped = copy.deepcopy(config)
        for key, value in shape.items():
            setattr(shaped, key, value)
        if isinstance(getattr(shaped, "layer_types", None), list):  # one entry per block: the first blocks' kept
            shaped.layer_types = shaped.layer_types[: shape["num_hidden_layers"]]
        torch.manual_seed(0)
        return auto_model_class(recipe.task).from_config(shaped).eval()

    shapes = [own] + [shape for shape in args.shapes if shape != own]
    models = {shape_name(shape): build(shape) for shape in shapes}
    prompts = torch.randint(0, config.vocab_size, (max(args.batch_sizes), args.prompt_tokens),
                            generator=torch.Generator().manual_seed(0))
    pad = config.pad_token_id if config.pad_token_id is not None else 0

    rows = []
    for batch_size in args.batch_sizes:
        times = interleaved_generation_seconds(models, prompts[:batch_size], args.new_tokens, pad, args.repeats)
        baseline = statistics.median(times[shape_name(own)])
        for name, model in models.items():
            seconds = statistics.median(times[name])
            rows.append({"batch_size": batch_size, "shape": name, "own": name == shape_name(own),
                         "parameters": parameter_count(model), "seconds": seconds,
                         "tokens_per_second": batch_size * args.new_tokens / seconds, "speedup": baseline / seconds,
                         "all_seconds": [round(s, 3) for s in times[name]]})
            print(json.dumps(rows[-1]), flush=True)

    setup = {"recipe": args.recipe, "model": recipe.model.name_or_path, "new_tokens": args.new_tokens,
             "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
             "dtype": str(next(iter(models.values())).dtype)}
    result = {"setup": setup, "rows": rows}
    if args.output_dir:
        output = Path(args.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / "shape-speed.json").write_text(json.dumps(result, indent=2))
        (output / "shape-speed.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
