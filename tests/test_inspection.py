import torch
from transformers import AutoModelForSequenceClassification

from hf_modelopt.inspection import format_report, inspect_model


def test_counts_and_sparsity(tiny_models):
    folder = tiny_models("bert")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    weight = model.bert.encoder.layer[0].intermediate.dense.weight
    with torch.no_grad():
        weight[: weight.shape[0] // 2] = 0  # half of one tensor
    report = inspect_model(model, folder)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    stats = next(t for t in report["tensors"] if t["name"] == "bert.encoder.layer.0.intermediate.dense.weight")
    assert stats["sparsity"] == 0.5
    assert report["sparsity"] * report["parameters"] >= weight.numel() / 2
    assert report["size_on_disk_bytes"] == (folder / "model.safetensors").stat().st_size
    assert "bert.encoder.layer.0.intermediate.dense.weight" in format_report(report)
