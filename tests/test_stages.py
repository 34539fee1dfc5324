import pytest

from hf_modelopt.stages import STAGES, StageConfig, load_builtin_stages, register_stage


def test_builtin_stages_are_registered():
    load_builtin_stages()
    assert {"finetune", "evaluate", "export"} <= set(STAGES)
    assert STAGES["evaluate"].changes_model is False and STAGES["finetune"].changes_model is True


def test_a_name_cannot_be_registered_twice():
    load_builtin_stages()
    with pytest.raises(ValueError, match="already registered"):
        register_stage("finetune", StageConfig)(lambda state, config, context: state)


def test_stage_configs_reject_unknown_keys():
    load_builtin_stages()
    with pytest.raises(Exception, match="extra"):
        STAGES["evaluate"].config_cls.model_validate({"batchsize": 3})


def test_a_new_stage_plugs_in_through_the_registry(tiny_models, sst2_files, tmp_path):
    """The README's example stage: registered once, validated from a recipe, run, saved and exported."""
    from safetensors.torch import load_file

    from hf_modelopt.modeling import ensure_loaded
    from hf_modelopt.pipeline import run_recipe
    from hf_modelopt.recipe import validate_recipe

    from .conftest import tiny_recipe

    class ZeroBiasesConfig(StageConfig):
        """Set every bias to zero."""

    if "zero_biases" not in STAGES:
        @register_stage("zero_biases", ZeroBiasesConfig)
        def zero_biases(state, config, context):
            ensure_loaded(state, context.recipe)
            for name, parameter in state.model.named_parameters():
                if name.endswith("bias"):
                    parameter.data.zero_()
            return state

    recipe = validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=["zero_biases", "evaluate"]))
    run_recipe(recipe, tmp_path / "out")
    weights = load_file(tmp_path / "out" / "model.safetensors")
    biases = [v for k, v in weights.items() if k.endswith("bias")]
    assert biases and all(not b.any() for b in biases)
    assert (tmp_path / "out" / "stages" / "zero_biases" / "stage.json").is_file()
