"""examples/prune_minitron.py runs end to end on a tiny random Llama (the MiniLM tokenizer) and saves a plain
model of the pruned shape."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

from tests.conftest import REPO, minilm_folder, write_small_data
from tests.examples.test_examples import ENV


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("minitron-example")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      intermediate_size=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_small_data(root / "data")
    return root


@pytest.mark.parametrize("flags", [
    ["--num-hidden-layers", "3", "--hidden-size", "24", "--intermediate-size", "32", "--num-attention-heads", "2"],
    ["--target-params", "900000", "--depth-importance", "block_influence"],
])
def test_prune_minitron_example(tiny_llama, flags, tmp_path):
    command = [sys.executable, str(REPO / "examples" / "prune_minitron.py"), "--model", str(tiny_llama / "model"),
               "--text-file", str(tiny_llama / "data" / "text" / "train.txt"), "--output-dir", str(tmp_path / "out"),
               "--seq-length", "32", "--batch-size", "2", "--calibration-batches", "2", "--eval-tokens", "256",
               *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("metrics: ")]
    metrics = json.loads(lines[0].removeprefix("metrics: "))
    assert metrics["parameters_after"] < metrics["parameters_before"]
    assert metrics["perplexity_before"] > 1 and metrics["perplexity_after_pruning"] > 1
    if "--target-params" in flags:
        assert metrics["parameters_after"] <= 900000
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {key: saved[key] for key in metrics["shape_after"]} == metrics["shape_after"]
    assert "quantization_config" not in saved
