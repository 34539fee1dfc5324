"""int8 / int4 storage in compressed-tensors: plain `from_pretrained` in a fresh process that never imports
hf_modelopt returns exactly the weights `fake_quantize_in_place_` computes."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_modelopt import PruningConfig, StructuredPruningConfig, prune_, save_compressed
from hf_modelopt.formats.compressed_tensors import fake_quantize_in_place_, plan, save_compressed_tensors
from hf_modelopt.formats.detect import detect_format
from hf_modelopt.quant import StorageQuantizationConfig

RELOAD_WITHOUT_PLUGIN = """
import json, sys
import torch, transformers
model = getattr(transformers, sys.argv[2]).from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(json.loads(sys.argv[3]))).logits
assert "hf_modelopt" not in sys.modules
print(json.dumps(logits.tolist()))
"""


def reload_without_plugin(folder, model_class: str, ids: torch.Tensor) -> torch.Tensor:
    # cwd outside the repository: `import hf_modelopt` could not even find the package there by accident
    run = subprocess.run([sys.executable, "-c", RELOAD_WITHOUT_PLUGIN, str(folder), model_class,
                          json.dumps(ids.tolist())], capture_output=True, text=True, cwd=folder)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("model_type,task,bits", [("bert", "text-classification", 8),
                                                  ("bert", "text-classification", 4), ("llama", "causal-lm", 4)])
def test_reloads_with_plain_transformers_as_the_fake_quantized_model(wide_tiny_models, tmp_path, model_type, task,
                                                                     bits):
    cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModelForCausalLM
    model = cls.from_pretrained(wide_tiny_models(model_type, task)).eval()
    prune_(model, PruningConfig(sparsity=0.5))  # zeros stay zeros: symmetric codes, no zero point
    report = save_compressed_tensors(model, tmp_path / "ct", linear_bits=bits, group_size=32, skip=("classifier",))
    assert set(report.formats.values()) == {f"int{bits}"}
    assert detect_format(tmp_path / "ct").name == "compressed-tensors"
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    expected = copy.deepcopy(model)
    fake_quantize_in_place_(expected, linear_bits=bits, group_size=32, skip=("classifier",))
    ids = torch.randint(5, 1000, (2, 12))
    with torch.no_grad():
        reference, full = expected(input_ids=ids).logits, model(input_ids=ids).logits
    reloaded = reload_without_plugin(tmp_path / "ct", cls.__name__, ids)
    assert torch.equal(reloaded, reference)
    assert not torch.equal(reloaded, full)  # the codes really were rounded
    zeros = (model.get_submodule(next(iter(report.formats))).weight == 0)
    assert (expected.get_submodule(next(iter(report.formats))).weight[zeros] == 0).all()


def test_what_compressed_tensors_cannot_hold_is_named(tiny_models):
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_models("gpt2", "causal-lm"))
    quantized, kept = plan(gpt2, 8, 8, 32)
    assert not quantized and "Conv1D" in kept["transformer.h.0.attn.c_attn"]
    assert "embedding" in kept["transformer.wte"]
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_models("bert"))
    quantized, kept = plan(bert, 8, None, 64)  # tiny BERT rows are 32 wide
    assert "not a multiple of group_size 64" in kept["bert.encoder.layer.0.attention.self.query"]


@pytest.mark.parametrize("case", ["gpt2", "structured-bert"])
def test_storage_falls_back_to_the_hf_modelopt_format_where_compressed_tensors_cannot(tiny_models, wide_tiny_models,
                                                                                      tmp_path, case):
    if case == "gpt2":
        model = AutoModelForCausalLM.from_pretrained(tiny_models("gpt2", "causal-lm"))
    else:  # fewer heads than BERT's config can describe: layer shapes only hf-modelopt's loader knows
        model = AutoModelForSequenceClassification.from_pretrained(wide_tiny_models("bert"))
        prune_(model, StructuredPruningConfig(heads=0.5, importance="magnitude"))
    fmt = save_compressed(model, tmp_path / case, storage=StorageQuantizationConfig(group_size=32))
    assert (fmt.name, fmt.loads_with) == ("hf-modelopt", "hf_modelopt")


def test_sparse_with_compressed_tensors_storage_is_refused(wide_tiny_models, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(wide_tiny_models("bert"))
    with pytest.raises(ValueError, match="no sparse format"):
        save_compressed(model, tmp_path / "x", sparse=True, storage=StorageQuantizationConfig())
