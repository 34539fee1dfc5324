"""The scripts in examples/ run end to end on a tiny random BERT: under `accelerate launch` and alone.

Each test runs a script as a user would (a subprocess), reads the `metrics: {...}` line it prints, and
checks the saved folder by loading it back with `from_pretrained`.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

from tests.conftest import REPO, minilm_folder, write_small_data

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tiny_bert(folder, hidden_size=32, intermediate_size=64):
    """A random 2-layer BERT classifier with the MiniLM WordPiece tokenizer, saved into `folder`."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=intermediate_size, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    write_small_data(root / "data")  # 64 train, 32 eval rows: sentence / label
    return root


@pytest.fixture(scope="module")
def tiny_model(workdir):
    return tiny_bert(workdir / "bert")


@pytest.fixture(scope="module")
def wide_model(workdir):
    # 64 features in: bitsandbytes' 4-bit CPU kernels reject narrower layers (they would stay in fp32).
    return tiny_bert(workdir / "wide-bert", hidden_size=64, intermediate_size=128)


def run_example(script, model, workdir, output, *flags, processes=1):
    """Run examples/`script`; returns the metrics it printed (exactly once: by the main process only)."""
    data = workdir / "data" / "sst2"
    command = [str(REPO / "examples" / script), "--model", str(model), "--train-file", str(data / "train.tsv"),
               "--eval-file", str(data / "validation.tsv"), "--output-dir", str(output), *map(str, flags)]
    if processes > 1:
        command = ["-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "recipes" / "accelerate" / "cpu-2proc.yaml"), "--num_processes", str(processes),
                   "--main_process_port", "29561", *command]
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=ENV, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("metrics: ")]
    assert len(lines) == 1, result.stdout[-3000:]
    metrics = json.loads(lines[0].removeprefix("metrics: "))
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["f1"] <= 1.0
    return metrics


def load(folder, loads_with):
    if loads_with == "hf_modelopt":
        import hf_modelopt  # noqa: F401  registers the loading hooks of hf-modelopt's formats
    return AutoModelForSequenceClassification.from_pretrained(folder)


RELOAD = """
import json, sys, torch
if sys.argv[2] == "hf_modelopt":
    import hf_modelopt  # what the format says to import before from_pretrained
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
weights = [m.weight for m in model.bert.encoder.modules() if isinstance(m, torch.nn.Linear)]
print(json.dumps({"zeros": sum(int((w == 0).sum()) for w in weights), "total": sum(w.numel() for w in weights)}))
"""


def test_prune_gradual_in_two_processes(tiny_model, workdir):
    output = workdir / "gmp"
    metrics = run_example("prune_gradual.py", tiny_model, workdir, output, "--sparsity", 0.5, "--update-every", 1,
                          "--max-steps", 6, "--batch-size", 4, "--learning-rate", 1e-3, processes=2)
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert metrics["train_loss"] < 1.0  # ~ln 2 of a random 2-class model, not multiplied by the process count
    assert metrics["loads_with"] == "hf_modelopt"  # the sparse bitmask format, not plain safetensors
    # A fresh process, as a user would load it: the zeros are there after a dense reload.
    result = subprocess.run([sys.executable, "-c", RELOAD, str(output), metrics["loads_with"]], capture_output=True,
                            text=True, env=ENV, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert counts["zeros"] / counts["total"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow  # (keeps the default suite under 15 min; runs with -m slow)
def test_distill_keeps_the_asked_layers(tiny_model, workdir):
    output = workdir / "student"
    metrics = run_example("distill.py", tiny_model, workdir, output, "--layers", "1", "--max-steps", 3,
                          "--batch-size", 8, "--max-eval-samples", 16)
    assert metrics["copied_from"] == [1]
    assert metrics["parameters"] < metrics["teacher_parameters"]
    student = load(output, metrics["loads_with"])
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    assert sum(p.numel() for p in student.parameters()) == metrics["parameters"]


@pytest.mark.slow
def test_prune_structured_saves_smaller_layers(tiny_model, workdir):
    output = workdir / "structured"
    metrics = run_example("prune_structured.py", tiny_model, workdir, output, "--heads", 0.5, "--neurons", 0.5,
                          "--calibration-batches", 2, "--max-steps", 2, "--batch-size", 8, "--distill")
    assert metrics["parameters"] < metrics["parameters_before"]
    pruned = load(output, metrics["loads_with"])
    for layer in pruned.bert.encoder.layer:
        assert layer.intermediate.dense.out_features == 32  # of 64 neurons
        assert layer.attention.self.query.out_features == 16  # 1 of 2 heads of 16
    assert sum(p.numel() for p in pruned.parameters()) == metrics["parameters"]


@pytest.mark.parametrize("method", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantize_reloads_bitsandbytes_layers_with_equal_logits(method, wide_model, workdir):
    output = workdir / f"quantized-{method}"
    metrics = run_example("quantize.py", wide_model, workdir, output, "--method", method, "--max-eval-samples", 16)
    assert metrics["loads_with"] == "transformers" and metrics["footprint_mb"] < metrics["reference_footprint_mb"]

    import bitsandbytes as bnb

    from hf_modelopt import QuantizationConfig, quantize

    reloaded = AutoModelForSequenceClassification.from_pretrained(output)
    layer = reloaded.bert.encoder.layer[0].output.dense
    assert isinstance(layer, bnb.nn.Linear4bit if method == "nf4" else bnb.nn.Linear8bitLt)
    # Quantization is deterministic: the same model quantized here gives the reloaded folder's logits.
    expected = quantize(AutoModelForSequenceClassification.from_pretrained(wide_model),
                        QuantizationConfig(method=method))
    batch = AutoTokenizer.from_pretrained(output)(["a fine film", "dull and long , far too long"], padding=True,
                                                  return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(reloaded(**batch).logits, expected(**batch).logits, atol=1e-5, rtol=1e-5)
