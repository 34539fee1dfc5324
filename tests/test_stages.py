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
