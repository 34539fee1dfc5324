"""`export_model` from Python: a model, a tokenizer and a plain `Provenance`, no recipe."""

import json

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_modelopt.export import ExportConfig, Provenance, export_model
from hf_modelopt.metrics import evaluate_model
from hf_modelopt.modeling import ModelConfig
from hf_modelopt.tasks import TextClassificationData


def test_export_without_a_recipe_is_verified_and_measured(tiny_models, sst2_files, tmp_path):
    base = tiny_models("bert", "text-classification")
    model = AutoModelForSequenceClassification.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    provenance = Provenance(
        task="text-classification", base_model=ModelConfig(name_or_path=str(base)),
        data=TextClassificationData(data_dir=str(sst2_files), train_file="sst2/train.tsv",
                                    eval_file="sst2/validation.tsv", text_column="sentence", max_length=32),
        description="exported from a script",
    )
    out = tmp_path / "out"
    record = export_model(model, tokenizer, out, provenance, ExportConfig(latency_repeats=0))
    assert record["reload_check"]["passed"] and record["format"]["name"] == "dense"
    # Re-measured in the fresh process on the data settings it was given: what this process measures on it.
    expected = evaluate_model(model, tokenizer, provenance.data, task="text-classification")
    assert record["metrics"] == pytest.approx(expected) and record["metrics"]["eval_samples"] == 32
    assert record["figures"]["base"]["parameters"] == record["figures"]["export"]["parameters"]
    assert json.loads((out / "export.json").read_text())["files"].keys() >= {"config.json", "model.safetensors"}
    assert not (out / "recipe.yaml").exists()  # no settings given: none written, and the card has no recipe section
    card = (out / "README.md").read_text()
    assert "exported from a script" in card and "## Recipe" not in card
    assert str(tmp_path) not in (out / "export.json").read_text()  # local paths written relative to the export
