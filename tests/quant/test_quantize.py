"""`quantize(model, config, calibration)`: bitsandbytes with the sensitivity scan and KD recovery, outside a recipe."""

import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from hf_modelopt import QuantizationConfig, quantize, save_compressed
from hf_modelopt.formats.bitsandbytes import repacked_layers
from hf_modelopt.quant import RecoveryConfig, SensitivityConfig


def lm_batches(folder, count=4):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["the film is a fine piece of work", "slow , dull and far too long for what it says"]
    batches = []
    for _ in range(count):
        batch = dict(tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt"))
        batch["labels"] = batch["input_ids"].clone()
        batches.append(batch)
    return batches


def test_sensitivity_keeps_the_most_sensitive_block_in_full_precision(wide_tiny_models):
    folder = wide_tiny_models("llama", "causal-lm")
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = QuantizationConfig(method="nf4", sensitivity=SensitivityConfig(keep_fraction=0.5, calibration_samples=4))
    quantized = quantize(model, config, calibration=lm_batches(folder))
    scan = quantized.sensitivity_results
    kept = [r.unit for r in scan if r.kept]
    assert len(scan) == 2 and kept == [scan[0].unit]  # the higher KL of the two blocks
    report = quantized.quantization_report
    assert all(report.skipped[name].startswith("sensitivity scan") for name in report.skipped if kept[0] in name)
    assert not any(kept[0] in name for name in report.quantized)


def test_sensitivity_and_recovery_need_calibration_data(wide_tiny_models):
    model = AutoModelForCausalLM.from_pretrained(wide_tiny_models("llama", "causal-lm"))
    with pytest.raises(ValueError, match="calibration="):
        quantize(model, QuantizationConfig(method="nf4", recovery=RecoveryConfig(rank=4)))


def test_recovery_trains_adapters_that_save_with_the_base_after_running(wide_tiny_models, tmp_path):
    folder = wide_tiny_models("llama", "causal-lm")
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = QuantizationConfig(method="nf4", recovery=RecoveryConfig(rank=4, training={"max_steps": 3,
                                                                                         "learning_rate": 1e-2}))
    recovered = quantize(model, config, calibration=lm_batches(folder))
    batch = {k: v for k, v in lm_batches(folder, 1)[0].items() if k != "labels"}
    with torch.no_grad():
        expected = recovered(**batch).logits
    # It ran on CPU: where the CPU has AVX512-BF16, bitsandbytes repacked its 4-bit weights in place (what the save
    # must undo); elsewhere the weights stay as quantized, and the save and reload below must hold all the same.
    assert bool(repacked_layers(recovered.get_base_model())) == has_avx512bf16()
    fmt = save_compressed(recovered, tmp_path / "q")
    assert fmt.name == "base-with-adapter" and fmt.loads_with == "transformers"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-4)


def test_a_dataloader_trains_the_recovery_on_its_dataset(wide_tiny_models):
    folder = wide_tiny_models("bert")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [dict(tokenizer(text), labels=label) for text, label in [("good", 1), ("bad", 0)] * 8]
    from transformers import DataCollatorWithPadding

    loader = DataLoader(rows, batch_size=4, collate_fn=DataCollatorWithPadding(tokenizer))
    config = QuantizationConfig(method="nf4", recovery=RecoveryConfig(rank=2, training={"num_train_epochs": 1}))
    recovered = quantize(AutoModelForSequenceClassification.from_pretrained(folder), config, calibration=loader)
    lora_b = [p for name, p in recovered.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it was trained
