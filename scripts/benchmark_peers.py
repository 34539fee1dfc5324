#!/usr/bin/env python
"""Our recipes' models next to what a user would otherwise do with the usual tools, measured in one run.

The peers, each built from the same base model (the fine-tuned teacher, or the dense LLM):

- `torch-prune-S`: `torch.nn.utils.prune.global_unstructured` (L1 magnitude) at sparsity S over the Linear
  layers inside the transformer blocks (the layers our pruning recipes target), one shot, no retraining;
  saved dense (`prune.remove`), as torch leaves it;
- `torch-dynamic-int8`: `torch.ao.quantization.quantize_dynamic` of every Linear to int8 (fbgemm / onednn
  kernels); its size is that of `torch.save(state_dict)`, since such a model cannot be saved as safetensors;
- `bnb-int8`, `bnb-nf4`: plain bitsandbytes through `BitsAndBytesConfig`, the classification head skipped
  (bitsandbytes' 4-bit CPU kernel rejects a 2-output layer) and nothing else tuned;
- a cross-entropy-only student (`--ce-student`, the output of `recipes/sst2-minilm/ce-3l.yaml`).

Every model, ours (`--ours NAME=FOLDER`) and the peers, goes through `hf_modelopt.benchmark.run_benchmark`:
the recipe's metric, parameters, weights on disk, peak memory, latency and throughput at batch 1 and 32,
in one process. Writes OUTPUT/bench.{md,json} and the plots.

Usage: python scripts/benchmark_peers.py --recipe recipes/sst2-minilm/finetune.yaml --base TEACHER_FOLDER \\
           --ours distill-3l=d3 --ours gmp-90=gmp90 --ce-student ce3 --output-dir bench/sst2
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

SCRIPT = Path(__file__).resolve()
BLOCK_LINEAR = re.compile(r"\.(layer|layers|h)\.\d+\.")  # Linear layers inside BERT / Llama / GPT-2 blocks


def _task_class(task: str):
    import transformers

    from hf_modelopt.tasks import get_task

    return getattr(transformers, get_task(task).auto_class)


def _task_of(folder: str) -> str:
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(folder).architectures or [""]
    return "causal-lm" if architectures[0].endswith("ForCausalLM") else "text-classification"


def torch_prune(base: str, sparsity: float, folder: Path) -> Path:
    """Global L1 unstructured pruning with torch.nn.utils.prune, saved dense into `folder`."""
    import torch
    from torch.nn.utils import prune

    model = _task_class(_task_of(base)).from_pretrained(base)
    targets = [(module, "weight") for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and BLOCK_LINEAR.search(f".{name}")]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        prune.remove(module, name)
    model.save_pretrained(folder)
    return folder


def build_dynamic_int8(base: str):
    """torch's dynamic int8 quantization of every Linear (also called by the peak-memory process)."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    model = _task_class(_task_of(base)).from_pretrained(base).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice (torchao is its successor)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def bitsandbytes(base: str, method: str, folder: Path) -> Path:
    """Plain bitsandbytes int8 / NF4 via BitsAndBytesConfig, saved before any forward pass."""
    import torch
    from transformers import BitsAndBytesConfig

    skip = ["classifier", "score", "lm_head"]
    config = (BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip) if method == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                 llm_int8_skip_modules=skip))
    model = _task_class(_task_of(base)).from_pretrained(base, quantization_config=config)
    model.save_pretrained(folder)  # before the first forward: the CPU 4-bit kernel repacks weights in place
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="the recipe whose task metric and evaluation data are used")
    parser.add_argument("--base", required=True, help="folder of the model the peers start from (the reference row)")
    parser.add_argument("--base-name", default="base (reference)", help="its name in the tables")
    parser.add_argument("--ours", action="append", default=[], metavar="NAME=FOLDER", help="one of our exports")
    parser.add_argument("--ce-student", help="folder of a cross-entropy-only student (ce-3l.yaml's output)")
    parser.add_argument("--prune-sparsities", type=float, nargs="*", default=[0.5, 0.9])
    parser.add_argument("--skip", nargs="*", default=[], help="peers to leave out (torch-prune, "
                        "torch-dynamic-int8, bnb-int8, bnb-nf4)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes per model and batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed forward passes before them")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from hf_modelopt.benchmark import Candidate, folder_candidate, format_benchmark, run_benchmark, write_benchmark
    from hf_modelopt.pipeline import preflight
    from hf_modelopt.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    preflight(recipe)
    task = recipe.task
    output = Path(args.output_dir)
    peers = output / "peers"
    peers.mkdir(parents=True, exist_ok=True)

    candidates = [folder_candidate(args.base, task, name=args.base_name)]
    for entry in args.ours:
        name, _, folder = entry.partition("=")
        candidates.append(folder_candidate(folder, task, name=f"hf-modelopt {name}"))
    if args.ce_student:
        candidates.append(folder_candidate(args.ce_student, task, name="peer: CE-only student"))
    if "torch-prune" not in args.skip:
        for sparsity in args.prune_sparsities:
            folder = torch_prune(args.base, sparsity, peers / f"torch-prune-{sparsity:g}")
            candidates.append(folder_candidate(folder, task, name=f"peer: torch prune {sparsity:.0%}"))
            candidates[-1].notes = "global L1 over the block Linear layers, one shot, saved dense"
    if "torch-dynamic-int8" not in args.skip:
        with tempfile.TemporaryDirectory() as scratch:
            import torch

            model = build_dynamic_int8(args.base)
            torch.save(model.state_dict(), Path(scratch) / "state.pt")
            size = os.path.getsize(Path(scratch) / "state.pt")
        candidates.append(Candidate("peer: torch dynamic int8", lambda: build_dynamic_int8(args.base),
                                    tokenizer=candidates[0].tokenizer, size_bytes=size,
                                    memory_loader=f"{SCRIPT}:build_dynamic_int8", memory_argument=args.base,
                                    notes="size of torch.save(state_dict): not loadable with from_pretrained"))
    for method in ("int8", "nf4"):
        if f"bnb-{method}" not in args.skip:
            folder = bitsandbytes(args.base, method, peers / f"bnb-{method}")
            candidates.append(folder_candidate(folder, task, name=f"peer: bitsandbytes {method}"))
            candidates[-1].tokenizer = candidates[0].tokenizer
    result = run_benchmark(candidates, recipe, tuple(args.batch_sizes), repeats=args.repeats, warmup=args.warmup)
    result["setup"]["command"] = shlex.join(["python", "scripts/benchmark_peers.py", *sys.argv[1:]])
    write_benchmark(result, output)
    print(format_benchmark(result))


if __name__ == "__main__":
    main()
