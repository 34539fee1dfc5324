"""`model:` loading options: dtype, device_map and attn_implementation reach `from_pretrained`, for the recipe's
model and for every stage output loaded back, and bad values fail before any work."""

import pytest
import torch

from hf_modelopt.errors import RecipeError
from hf_modelopt.modeling import ModelConfig, load_model
from hf_modelopt.recipe import validate_recipe

from .conftest import tiny_recipe


def test_dtype_device_map_and_attention_reach_from_pretrained(tiny_models, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = str(tiny_models("llama", "causal-lm"))
    # transformers on CPU leaves no trace of a device map on the model: record what from_pretrained was given
    # (the real from_pretrained still loads the model).
    calls, original = [], AutoModelForCausalLM.from_pretrained.__func__
    def recording(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    spec = ModelConfig(name_or_path=folder, dtype="bfloat16", device_map="cpu", attn_implementation="eager")
    model = load_model(spec, "causal-lm")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert calls[-1]["device_map"] == "cpu"
    plain = load_model(ModelConfig(name_or_path=folder), "causal-lm")  # defaults: the checkpoint's dtype, sdpa
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    assert plain.config._attn_implementation == "sdpa" and "device_map" not in calls[-1]


def test_stage_outputs_load_back_with_the_same_options(tiny_models, sst2_files, tmp_path):
    from hf_modelopt.pipeline import run_recipe

    recipe = tiny_recipe(tiny_models("bert"), sst2_files, verify_export=False)
    recipe["model"].update(dtype="float32", attn_implementation="eager")
    recipe["stages"] = [{"type": "finetune"}, {"type": "evaluate"}]
    run_recipe(validate_recipe(recipe), tmp_path / "out")
    reloaded = load_model(validate_recipe(recipe).model, "text-classification",
                          path=str(tmp_path / "out" / "stages" / "finetune" / "model"))
    assert reloaded.config._attn_implementation == "eager"


def test_an_unknown_dtype_is_named_before_any_work(tiny_models, sst2_files):
    recipe = tiny_recipe(tiny_models("bert"), sst2_files)
    recipe["model"]["dtype"] = "float8"
    with pytest.raises(RecipeError, match=r"model\.dtype: .*'auto', 'float32', 'bfloat16' or 'float16'"):
        validate_recipe(recipe)


def test_device_map_is_refused_under_several_processes(tiny_models, sst2_files, tmp_path, monkeypatch):
    from hf_modelopt.pipeline import preflight

    recipe = tiny_recipe(tiny_models("bert"), sst2_files)
    recipe["model"]["device_map"] = "auto"
    preflight(validate_recipe(recipe))  # one process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match=r"model\.device_map: 2 processes would each spread"):
        preflight(validate_recipe(recipe))
