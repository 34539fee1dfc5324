"""Minitron pruning of a decoder LLM: score blocks, heads, FFN neurons and embedding channels on calibration
text (forward passes only), prune to a smaller uniform shape or to a parameter budget, save a plain model.

    python examples/prune_minitron.py --model path/to/SmolLM2-135M --target-params 90000000 --output-dir out/m
    python examples/prune_minitron.py --model path/to/SmolLM2-135M --num-hidden-layers 24 --hidden-size 512 \\
        --intermediate-size 1024 --output-dir out/m

The text file is split once: calibration windows from its start, perplexity on held-out windows from its end
(never on calibration text). No recovery training here: the perplexity after pruning is before any KD.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from hf_modelopt import prune_
from hf_modelopt.prune import MinitronConfig
from hf_modelopt.prune.minitron.config import SHAPE_KEYS
from hf_modelopt.tasks.causal_lm import evaluate_perplexity

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a causal LM folder or Hub id (llama, mistral, qwen2, qwen3)")
    parser.add_argument("--text-file", default=str(TEXT), help="plain text: calibration from the start, "
                        "held-out perplexity from the end")
    parser.add_argument("--output-dir", default="out/example-prune-minitron")
    parser.add_argument("--seq-length", type=int, default=256, help="tokens per calibration / evaluation window")
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per calibration batch")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens, from the text's end")
    for key in SHAPE_KEYS:
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"target {key}")
    parser.add_argument("--target-params", type=int, default=None, help="a parameter budget instead of a shape")
    parser.add_argument("--target-params-counted", choices=["total", "non_embedding"], default="total")
    parser.add_argument("--depth-importance", choices=["lm_loss", "block_influence"], default="lm_loss")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = tokenizer(Path(args.text_file).read_text(), add_special_tokens=False)["input_ids"]
    calibration_tokens = args.calibration_batches * args.batch_size * args.seq_length
    if len(ids) < calibration_tokens + 2:
        raise SystemExit(f"{args.text_file} holds {len(ids)} tokens; calibration alone needs {calibration_tokens}")
    held_out = ids[max(calibration_tokens, len(ids) - args.eval_tokens):]  # disjoint from the calibration text
    windows = torch.tensor(ids[:calibration_tokens]).view(-1, args.batch_size, args.seq_length)
    batches = [{"input_ids": window} for window in windows]

    shape = {key: getattr(args, key) for key in SHAPE_KEYS if getattr(args, key) is not None}
    config = MinitronConfig(**shape, target_params=args.target_params,
                            target_params_counted=args.target_params_counted,
                            depth_importance=args.depth_importance, calibration_batches=len(batches))
    before = evaluate_perplexity(model, held_out, args.seq_length, args.batch_size)["perplexity"]
    report = prune_(model, config, batches)
    after = evaluate_perplexity(model, held_out, args.seq_length, args.batch_size)["perplexity"]
    print(report["importance_table"])
    model.save_pretrained(args.output_dir)  # a plain config of the same family: from_pretrained, no hf-modelopt
    tokenizer.save_pretrained(args.output_dir)
    metrics = {"perplexity_before": before, "perplexity_after_pruning": after,
               "held_out_tokens": len(held_out), "calibration_tokens": calibration_tokens,
               "parameters_before": report["parameters_before"], "parameters_after": report["parameters_after"],
               "shape_before": report["shape_before"], "shape_after": report["shape_after"],
               "dropped_layers": report["dropped_layers"], "depth_importance": args.depth_importance}
    print("metrics: " + json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
