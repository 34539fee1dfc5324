import json

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_modelopt.errors import UserError
from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import validate_recipe

from ..conftest import tiny_recipe


def test_quantize_stage_skips_the_classifier_and_reports_it(wide_tiny_models, sst2_files, tmp_path):
    stages = ["evaluate", {"type": "quantize", "method": "nf4"}, "evaluate"]
    result = run_recipe(validate_recipe(tiny_recipe(wide_tiny_models("bert"), sst2_files, stages=stages)),
                        tmp_path / "o")
    record = next(r for r in result["stages"] if r["type"] == "quantize")
    assert record["metrics"]["skipped_layers"] == 1 and record["metrics"]["reload_max_abs_diff"] <= 1e-4
    report = json.loads((tmp_path / "o" / "quantization.json").read_text())
    assert list(report["skipped"]) == ["classifier"]
    assert "`classifier` | 4-bit CPU kernel needs out_features divisible by 32" in \
        (tmp_path / "o" / "README.md").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "o")
    assert type(model.bert.encoder.layer[0].output.dense).__name__ == "Linear4bit"
    assert result["metrics"][1]["metrics"]["eval_samples"] == 32  # the quantized model evaluated


def test_quantize_stage_with_sensitivity_scan_and_kd_recovery(wide_tiny_models, sst2_files, tmp_path):
    stages = [{"type": "quantize", "method": "nf4", "double_quant": True,
               "sensitivity": {"keep_fraction": 0.5, "calibration_samples": 4},
               "recovery": {"rank": 4, "training": {"max_steps": 2}}}, "evaluate"]
    recipe = tiny_recipe(wide_tiny_models("llama", "causal-lm"), sst2_files, task="causal-lm", stages=stages)
    run_recipe(validate_recipe(recipe), tmp_path / "o")
    out = tmp_path / "o"
    for name in ("adapter_model.safetensors", "adapter_config.json", "sensitivity.png", "sensitivity.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "quantization.json").read_text())
    kept = report["sensitivity"]["kept_units"]
    assert len(kept) == 1 and report["skipped"][f"{kept[0]}.mlp.down_proj"].startswith("sensitivity scan")
    model = AutoModelForCausalLM.from_pretrained(out)  # base + adapters, through transformers' peft integration
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    # LoRA's B starts at zero: after two steps of recovery the saved adapters have moved.
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)
    log = json.loads((out / "stages" / "quantize" / "log_history.json").read_text())
    assert log[-1]["step"] == 2 and "sensitivity.png" in (out / "README.md").read_text()


def test_training_all_weights_or_quantizing_again_after_quantize_is_refused(wide_tiny_models, sst2_files,
                                                                             tmp_path):
    cases = {"finetune": "a finetune stage trains every weight, but stage 'q4' before it quantized them",
             "distill": "a distill stage trains every weight",
             "quantize": "stage 'q4' before it already quantized the model"}
    for later, message in cases.items():
        stage = {"type": later, "student": {"every": 2}} if later == "distill" else later
        recipe = tiny_recipe(wide_tiny_models("bert"), sst2_files, stages=[{"type": "quantize", "name": "q4"}, stage])
        with pytest.raises(UserError, match=r"stages\[1\]: " + message):
            run_recipe(validate_recipe(recipe), tmp_path / "o")
        assert not (tmp_path / "o").exists()


def test_recovery_needs_4bit_and_training_data(wide_tiny_models, sst2_files, tmp_path):
    stages = [{"type": "quantize", "method": "int8", "recovery": {}}]
    with pytest.raises(UserError, match="recovery trains adapters on 4-bit models only"):
        validate_recipe(tiny_recipe(wide_tiny_models("bert"), sst2_files, stages=stages))
    recipe = tiny_recipe(wide_tiny_models("bert"), sst2_files, stages=[{"type": "quantize", "recovery": {}}])
    recipe["data"]["train_file"] = None
    with pytest.raises(UserError, match=r"stages\[0\].recovery: needs training data"):
        run_recipe(validate_recipe(recipe), tmp_path / "o")


def test_quantize_storage_writes_compressed_tensors_that_plain_transformers_loads(wide_tiny_models, sst2_files,
                                                                                  tmp_path):
    import subprocess
    import sys

    stages = ["evaluate", {"type": "quantize_storage", "group_size": 32}, "evaluate", "export"]
    result = run_recipe(validate_recipe(tiny_recipe(wide_tiny_models("bert"), sst2_files, stages=stages)),
                        tmp_path / "o")
    out = tmp_path / "o"
    record = next(r for r in result["stages"] if r["type"] == "quantize_storage")
    assert record["metrics"]["reload_max_abs_diff"] == 0.0
    export = json.loads((out / "export.json").read_text())
    assert export["format"] == {"name": "compressed-tensors", "loads_with": "transformers"}
    report = json.loads((out / "quantization.json").read_text())
    assert report["format"] == "compressed-tensors" and set(report["formats"].values()) == {"int8"}
    assert "bert.embeddings.word_embeddings" in report["kept_in_full_precision"]
    # The metrics the export re-measured in a fresh process are those of the evaluate stage after storage.
    stored_eval = next(r for r in result["stages"] if r["type"] == "evaluate" and "quantize_storage" in r["model"])
    assert export["metrics"]["accuracy"] == stored_eval["metrics"]["accuracy"]
    assert "pip install compressed-tensors" in (out / "README.md").read_text()
    code = ("import sys, transformers\ntransformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1])\n"
            "assert 'hf_modelopt' not in sys.modules")
    run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=out)
    assert run.returncode == 0, run.stderr[-2000:]
