import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import RecipeError, validate_recipe

from .conftest import CAUSAL_LMS, CLASSIFIERS, tiny_recipe


@pytest.mark.parametrize("model_type", CLASSIFIERS)
def test_classification_recipe_end_to_end(model_type, tiny_models, sst2_files, tmp_path):
    recipe = validate_recipe(tiny_recipe(tiny_models(model_type), sst2_files))
    result = run_recipe(recipe, tmp_path / "out")
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["stage"] for m in metrics] == ["before", "after"]
    assert metrics[1]["model"].endswith("-> finetune") and 0 <= metrics[1]["metrics"]["accuracy"] <= 1
    assert metrics[1]["metrics"]["eval_samples"] == 32
    assert (out / "recipe.yaml").is_file() and (out / "README.md").is_file()
    assert (out / "model.safetensors").is_file() and not (out / ".export-tmp").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.model_type == model_type
    # The export was reloaded in a fresh process and re-measured to what the in-memory evaluation found.
    record = json.loads((out / "export.json").read_text())
    assert record["reload_check"]["passed"] and record["metrics"] == metrics[1]["metrics"]
    assert [r["name"] for r in result["stages"]] == ["before", "finetune", "after", "export"]


@pytest.mark.parametrize("model_type", CAUSAL_LMS)
def test_causal_lm_recipe_end_to_end(model_type, tiny_models, sst2_files, tmp_path):
    recipe = validate_recipe(tiny_recipe(tiny_models(model_type, "causal-lm"), sst2_files, task="causal-lm"))
    run_recipe(recipe, tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    before, after = (m["metrics"]["perplexity"] for m in metrics)
    # A random tiny model is near-uniform over 30k tokens; three steps at lr 1e-3 must already help.
    assert after < before <= 30522 * 1.5
    remeasured = json.loads((tmp_path / "out" / "export.json").read_text())["metrics"]["perplexity"]
    assert remeasured == pytest.approx(after, rel=1e-5)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == model_type


def test_unchanged_stages_are_reused(tiny_models, sst2_files, tmp_path, caplog):
    data = tiny_recipe(tiny_models("bert"), sst2_files, verify_export=False)  # about stage reuse only
    run_recipe(validate_recipe(data), tmp_path / "a")
    trained = (tmp_path / "a" / "stages" / "finetune" / "model" / "model.safetensors").read_bytes()
    with caplog.at_level(logging.INFO, logger="hf_modelopt"):
        run_recipe(validate_recipe(data), tmp_path / "a")  # same folder
        run_recipe(validate_recipe(data), tmp_path / "b")  # another folder: found through the cache index
    reused = [r.getMessage() for r in caplog.records if "reused" in r.getMessage()]
    assert sum("'finetune' reused" in m for m in reused) == 2
    assert (tmp_path / "b" / "stages" / "finetune" / "model" / "model.safetensors").read_bytes() == trained
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert json.loads((tmp_path / "b" / "metrics.json").read_text()) == first


def test_changed_config_is_recomputed(tiny_models, sst2_files, tmp_path, caplog):
    data = tiny_recipe(tiny_models("bert"), sst2_files, verify_export=False)  # about stage reuse only
    run_recipe(validate_recipe(data), tmp_path / "a")
    data["training"]["learning_rate"] = 5e-4
    with caplog.at_level(logging.INFO, logger="hf_modelopt"):
        run_recipe(validate_recipe(data), tmp_path / "a")
    assert not any("'finetune' reused" in r.getMessage() for r in caplog.records)


def test_unfinished_stage_is_not_reused(tiny_models, sst2_files, tmp_path, caplog):
    data = tiny_recipe(tiny_models("bert"), sst2_files, verify_export=False)  # about stage reuse only
    run_recipe(validate_recipe(data), tmp_path / "a")
    (tmp_path / "a" / "stages" / "finetune" / "stage.json").unlink()  # as if it crashed before finishing
    with caplog.at_level(logging.INFO, logger="hf_modelopt"):
        run_recipe(validate_recipe(data), tmp_path / "a")
    assert not any("'finetune' reused" in r.getMessage() for r in caplog.records)


def test_recipe_without_training_exports_the_base_model(tiny_models, sst2_files, tmp_path):
    recipe = validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=["evaluate"]))
    run_recipe(recipe, tmp_path / "out")
    # No stage changed the model: the export holds the base model's weights, unchanged.
    from safetensors.torch import load_file

    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").state_dict()
    base = load_file(tiny_models("bert") / "model.safetensors")
    assert set(base) <= set(exported) and all(torch.equal(exported[k], v) for k, v in base.items())


def test_missing_data_file_fails_before_any_output(tiny_models, sst2_files, tmp_path):
    data = tiny_recipe(tiny_models("bert"), sst2_files)
    data["data"]["train_file"] = "sst2/nope.tsv"
    with pytest.raises(RecipeError) as info:
        run_recipe(validate_recipe(data, "r.yaml"), tmp_path / "out")
    assert info.value.key == "data.train_file" and "nope.tsv" in info.value.message
    assert not (tmp_path / "out").exists()


def test_missing_local_model_fails_before_any_output(sst2_files, tmp_path):
    data = tiny_recipe(tmp_path / "no-such-model", sst2_files)
    with pytest.raises(RecipeError, match="folder not found"):
        run_recipe(validate_recipe(data), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_uncached_hub_model_offline_is_named(sst2_files, tmp_path):
    data = tiny_recipe(tmp_path, sst2_files)
    data["model"]["name_or_path"] = "nobody/not-a-cached-model"
    with pytest.raises(RecipeError, match="not in the Hugging Face cache"):
        run_recipe(validate_recipe(data), tmp_path / "out")


def test_rerun_from_runs_that_stage_and_later_ones_again(tiny_models, sst2_files, tmp_path, caplog):
    from hf_modelopt.errors import UserError

    stages = [{"type": "evaluate", "name": "before"}, "finetune", {"type": "evaluate", "name": "after"},
              {"type": "export", "verify": False}]  # the reload check is tested elsewhere; it costs a process
    recipe = validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages))
    run_recipe(recipe, tmp_path / "first")
    with caplog.at_level(logging.INFO, logger="hf_modelopt"):
        run_recipe(recipe, tmp_path / "again", rerun_from="finetune")
    logged = [record.getMessage() for record in caplog.records]
    assert any("Stage 'before' reused" in line for line in logged)
    assert any("Stage 'finetune' (finetune) starting" in line for line in logged)
    assert any("Stage 'after' (evaluate) starting" in line for line in logged)
    with pytest.raises(UserError, match="--rerun-from nowhere: the recipe has no stage of that name"):
        run_recipe(recipe, tmp_path / "bad", rerun_from="nowhere")


def test_corrupted_stage_cache_is_recomputed_and_exports_are_copies(tiny_models, sst2_files, tmp_path, caplog):
    """Case 5 of issue 28: 4 KB overwritten in a finished stage's weights change no export made from them (copies,
    not hard links), and the stage's content hashes refuse the damaged entry: the next run recomputes it."""
    import os

    from hf_modelopt.files import sha256_file

    data = tiny_recipe(tiny_models("bert"), sst2_files, verify_export=False)  # about the stage cache only
    run_recipe(validate_recipe(data), tmp_path / "a")
    run_recipe(validate_recipe(data), tmp_path / "b")  # finetune reused from a, through the cache index
    cached = tmp_path / "a" / "stages" / "finetune" / "model" / "model.safetensors"
    copies = [tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors",
              tmp_path / "b" / "stages" / "finetune" / "model" / "model.safetensors"]
    assert all(os.stat(copy).st_ino != os.stat(cached).st_ino for copy in copies)
    exported = {copy: copy.read_bytes() for copy in copies}
    record = json.loads((cached.parents[1] / "stage.json").read_text())
    assert record["files"]["model/model.safetensors"] == sha256_file(cached)

    with cached.open("r+b") as weights:  # 4 KB of 0xFF in the middle: float32 NaNs and huge values
        weights.seek(cached.stat().st_size // 2)
        weights.write(b"\xff" * 4096)
    assert all(copy.read_bytes() == exported[copy] for copy in copies)  # no export changed

    # Only run c's lines: where another test in this process set the logger to INFO (the CLI does), caplog also
    # holds runs a and b's, and b's "reused" is right.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_modelopt"):
        run_recipe(validate_recipe(data), tmp_path / "c")
    logged = [record.getMessage() for record in caplog.records]
    assert any("Stage 'finetune': the finished output in" in line and "model/model.safetensors changed since the "
               "stage finished" in line for line in logged), logged
    assert not any("Stage 'finetune' reused" in line for line in logged)
    assert any("Stage 'finetune' (finetune) starting" in line for line in logged)
    recomputed = (tmp_path / "c" / "model.safetensors").read_bytes()
    assert recomputed == exported[tmp_path / "b" / "model.safetensors"]  # the same training, run again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_modelopt"):
        run_recipe(validate_recipe(data), tmp_path / "a")  # in its own folder: the damaged output is replaced
    logged = [record.getMessage() for record in caplog.records]
    assert any(f"the finished output in {cached.parents[1]} is not reused" in line for line in logged)
    assert any(f"Stage 'finetune' reused from {tmp_path / 'c' / 'stages' / 'finetune'}" in line for line in logged)
    assert cached.read_bytes() == recomputed and (tmp_path / "a" / "model.safetensors").read_bytes() == recomputed


def test_export_records_no_absolute_local_path(tiny_models, sst2_files, tmp_path):
    """recipe.yaml, metrics.json and export.json name the base model and the data relative to the export."""
    import yaml

    data = tiny_recipe(tiny_models("bert"), sst2_files, verify_export=False)
    out = tmp_path / "runs" / "out"
    run_recipe(validate_recipe(data), out)
    local = [str(tiny_models("bert")), str(sst2_files), str(tmp_path)]
    for name in ("recipe.yaml", "metrics.json", "export.json", "README.md"):
        text = (out / name).read_text()
        if name == "README.md":  # the local card's loading code names the local folder; a push renders it again
            text = text.replace(f'"{out}"', '"OUT"')
        assert not any(path in text for path in local), (name, text[:2000])
    exported = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (out / exported["model"]["name_or_path"]).resolve() == tiny_models("bert").resolve()
    assert (out / exported["data"]["data_dir"]).resolve() == sst2_files.resolve()
    chain = json.loads((out / "metrics.json").read_text())[-1]["model"]
    assert chain == f"{exported['model']['name_or_path']} -> finetune"
