"""CPU deployment options for one exported classifier, side by side in one run (one process, interleaved timing).

    python scripts/benchmark_cpu_deploy.py OUT/ --recipe recipes/sst2-minilm/finetune.yaml --output-dir bench-cpu

Rows, each loaded the way a user would deploy it:
- `fp32`: `from_pretrained(folder)`.
- `dynamic-int8`: `torch.ao.quantization.quantize_dynamic` of the fp32 model's Linear layers (in memory only).
- `bf16`: `from_pretrained(folder, dtype=torch.bfloat16)`, saved and loaded back in bf16, where the CPU has bf16
  instructions.
- `torchao-int8-weight` / `torchao-int8-dynamic`: `from_pretrained(folder, quantization_config=TorchAoConfig(...))`,
  saved with `save_pretrained` and loaded back with `from_pretrained` (what a user ships), int8 weights only or
  int8 weights and dynamically quantized int8 activations.
- `compressed-tensors-int8`: `save_compressed(..., storage=StorageQuantizationConfig())`, reloaded with plain
  `from_pretrained` (its weights are decompressed to fp32: the disk shrinks, not the compute).
- `... +compile`: the same model after `torch.compile` (inductor); compilation happens in the warm-up rounds,
  which are not timed.

With `--baseline FOLDER` (the model a smaller one was made from, e.g. the teacher), that folder's fp32 row is timed in
the same interleaved run, and every row also reads as speed and accuracy relative to it.

Every row that ships a folder is reloaded in one fresh process that never imports hf_modelopt (plain
transformers, plus torchao for its rows), and its logits on a probe batch are compared with the row's model here:
the `plain reload` column says whether a user without this plugin gets the same model.

Accuracy is measured on the recipe's evaluation data for every row without compile (compiling does not change
the weights; a compiled model would recompile for every padded batch length); latency is the median of
`--repeats` interleaved forward passes on one random batch (batch 32 x 64 tokens by default).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an exported classifier folder (dense safetensors)")
    parser.add_argument("--recipe", required=True, help="recipe whose evaluation data measures accuracy")
    parser.add_argument("--output-dir", required=True, help="where bench.json and bench.md go")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--baseline", help="another exported classifier (e.g. the teacher) timed in the same run as "
                        "`baseline fp32`: speed and accuracy are also reported relative to it")
    return parser


def folder_size(folder) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def build_rows(folder: str, work: Path, baseline: str | None = None) -> dict[str, dict]:
    """name -> {"model", "folder" (what would ship; None for in-memory only)}."""
    from transformers import AutoModelForSequenceClassification, TorchAoConfig

    from hf_modelopt import save_compressed
    from hf_modelopt.quant import StorageQuantizationConfig

    load = AutoModelForSequenceClassification.from_pretrained
    rows = {"baseline fp32": {"model": load(baseline).eval(), "folder": baseline}} if baseline else {}
    rows["fp32"] = {"model": load(folder).eval(), "folder": folder}
    rows["dynamic-int8"] = {"model": torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(rows["fp32"]["model"]), {torch.nn.Linear}, dtype=torch.qint8), "folder": None}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # AVX512-BF16 / AMX: else bf16 matmuls are emulated, slowly
        saved = work / "bf16"
        load(folder, dtype=torch.bfloat16).save_pretrained(saved)
        rows["bf16"] = {"model": load(saved, dtype=torch.bfloat16).eval(), "folder": saved}
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    for name, config in (("torchao-int8-weight", Int8WeightOnlyConfig()),
                         ("torchao-int8-dynamic", Int8DynamicActivationInt8WeightConfig())):
        saved = work / name
        load(folder, quantization_config=TorchAoConfig(config), device_map="cpu").save_pretrained(saved)
        rows[name] = {"model": load(saved, device_map="cpu").eval(), "folder": saved}
    saved = work / "compressed-tensors-int8"
    save_compressed(rows["fp32"]["model"], saved, storage=StorageQuantizationConfig(skip_modules=["classifier"]))
    rows["compressed-tensors-int8"] = {"model": load(saved).eval(), "folder": saved}
    return rows


# Run in a fresh process whose cwd is outside the repository: nothing of hf_modelopt can be imported by accident.
PLAIN_RELOAD = """
import json, sys
import torch, transformers
ids = torch.tensor(json.loads(sys.argv[1]))
logits = {}
for folder in sys.argv[2:]:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, device_map="cpu").eval()
    with torch.no_grad():
        logits[folder] = model(input_ids=ids).logits.float().tolist()
assert "hf_modelopt" not in sys.modules, "hf_modelopt was imported"
print(json.dumps(logits))
"""


def plain_reload_differences(rows: dict[str, dict], tokenizer, work: Path) -> dict[str, float | None]:
    """Max |logit difference| between each shipped row's model here and its folder reloaded by plain transformers
    in a fresh process (None: the folder does not load there)."""
    import subprocess

    ids = tokenizer(["a gripping , beautifully acted film .", "the plot is thin and the jokes fall flat ."],
                    padding=True, return_tensors="pt")["input_ids"]
    shipped = {name: str(Path(row["folder"]).resolve()) for name, row in rows.items() if row["folder"]}
    run = subprocess.run([sys.executable, "-c", PLAIN_RELOAD, json.dumps(ids.tolist()), *shipped.values()],
                         capture_output=True, text=True, cwd=work)
    if run.returncode != 0:
        print(f"plain reload failed:\n{run.stderr[-2000:]}", flush=True)
        return dict.fromkeys(shipped)
    reloaded = json.loads(run.stdout.strip().splitlines()[-1])
    differences = {}
    for name, folder in shipped.items():
        with torch.no_grad():
            here = rows[name]["model"](input_ids=ids).logits.float()
        differences[name] = (here - torch.tensor(reloaded[folder])).abs().max().item()
    return differences


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    from transformers import AutoTokenizer

    from hf_modelopt import evaluate_model, load_recipe
    from hf_modelopt.benchmark import compare_latency

    logging.basicConfig(level=logging.WARNING)
    recipe = load_recipe(args.recipe)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cpu-deploy-") as work:
        rows = build_rows(args.model, Path(work), args.baseline)
        for name, row in rows.items():
            row["metrics"] = evaluate_model(row["model"], tokenizer, recipe.data, task=recipe.task)
            row["size_bytes"] = folder_size(row["folder"]) if row["folder"] else None
            print(f"{name}: {row['metrics']}", flush=True)
        reload_differences = plain_reload_differences(rows, tokenizer, Path(work))
        models = {name: row["model"] for name, row in rows.items()}
        if not args.no_compile:
            # (compressed-tensors computes as fp32 does; the baseline is timed as it is deployed today)
            for name in [n for n in rows if n not in ("compressed-tensors-int8", "baseline fp32")]:
                models[f"{name} +compile"] = torch.compile(rows[name]["model"])
        timings = compare_latency(models, args.batch_size, args.seq_len, args.repeats, warmup=3, progress=True)
    reference = timings["fp32"]["latency_ms"]
    baseline = rows.get("baseline fp32")
    table = []
    for name, timing in timings.items():
        row_name = name.removesuffix(" +compile")
        row = rows[row_name]
        accuracy = row["metrics"].get("accuracy")
        entry = {"option": name, "accuracy": accuracy,
                 "size_mb": None if row["size_bytes"] is None else round(row["size_bytes"] / 1e6, 1),
                 # microseconds: a tiny model's 0.3 ms rounded to 0.1 ms would no longer give its speed ratios
                 "latency_ms": round(timing["latency_ms"], 3),
                 "speedup_vs_fp32": round(reference / timing["latency_ms"], 2),
                 "plain_reload_max_abs_diff": reload_differences.get(row_name)}
        if baseline is not None:
            entry["speedup_vs_baseline"] = round(timings["baseline fp32"]["latency_ms"] / timing["latency_ms"], 2)
            entry["accuracy_vs_baseline"] = round(accuracy / baseline["metrics"]["accuracy"], 4)
        table.append(entry)
    setup = {"batch_size": args.batch_size, "seq_len": args.seq_len, "repeats": args.repeats,
             "threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model,
             "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "baseline": args.baseline}
    result = {"setup": setup, "rows": table}
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    against = f"; baseline: `{args.baseline}`" if baseline is not None else ""
    lines = [f"CPU deployment options for `{args.model}`: batch {args.batch_size} x {args.seq_len} tokens, "
             f"{setup['threads']} threads, median of {args.repeats} interleaved runs; accuracy without compile"
             f"{against}. Plain reload: the folder loaded by transformers in a fresh process without hf_modelopt, "
             "max |logit difference| to the row's model.", ""]
    header = "| option | accuracy | weights on disk (MB) | latency (ms) | speed vs fp32 |"
    if baseline is not None:
        header += " speed vs baseline | accuracy vs baseline |"
    lines += [header + " plain reload |", "|---" * header.count("|") + "|"]
    for r in table:
        accuracy = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f} %"
        size = "in memory only" if r["size_mb"] is None else f"{r['size_mb']}"
        line = f"| {r['option']} | {accuracy} | {size} | {r['latency_ms']:.1f} | {r['speedup_vs_fp32']}x |"
        if baseline is not None:
            line += f" {r['speedup_vs_baseline']}x | {100 * r['accuracy_vs_baseline']:.1f} % |"
        difference = r["plain_reload_max_abs_diff"]
        reload = "-" if r["size_mb"] is None else "fails" if difference is None else f"yes ({difference:.1e})"
        lines.append(line + f" {reload} |")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
