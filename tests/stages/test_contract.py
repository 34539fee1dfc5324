"""The stage contract: what a stage declares on registration is all the runner and the export go by, so a
third-party stage gets the behaviour of the built-in stage it imitates (issue 29)."""

import json
import re

import pytest
import yaml

from hf_modelopt.metrics import evaluate_model
from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import RecipeError, validate_recipe
from hf_modelopt.stages import STAGES, StageConfig, ensure_loaded, load_builtin_stages, register_stage

from ..conftest import tiny_recipe


@pytest.fixture
def register():
    """`register(name, config_cls, fn, **flags)`: a third-party stage for one test; STAGES is global, so it is
    unregistered afterwards."""
    load_builtin_stages()
    added = []

    def add(name, config_cls, fn, **flags):
        assert name not in STAGES
        register_stage(name, config_cls, **flags)(fn)
        added.append(name)

    yield add
    for name in added:
        del STAGES[name]


class MeasureConfig(StageConfig):
    """Measure the model on the evaluation data (imitates `evaluate`)."""

    requires_data = ("eval",)


def measure(state, config, context):
    ensure_loaded(state, context.settings)
    state.metrics = evaluate_model(state.model, state.tokenizer, context.settings.data, task=context.settings.task)
    return state


class ZeroBiasesConfig(StageConfig):
    """Set every bias to zero."""


def zero_biases(state, config, context):
    ensure_loaded(state, context.settings)
    for name, parameter in state.model.named_parameters():
        if name.endswith("bias"):
            parameter.data.zero_()
    return state


def _card_rows(card: str) -> dict[str, str]:
    """The evaluation table's rows of a model card: stage name -> the row's figures."""
    rows = {}
    for line in card.splitlines():
        found = re.match(r"\| `.*` \(stage `([^`]+)`\) \|(.*)$", line)
        if found:
            rows[found.group(1)] = found.group(2)
    return rows


def _card_tags(card: str) -> list[str]:
    return yaml.safe_load(card.split("---")[1])["tags"]


def test_a_stage_that_produces_metrics_is_reported_as_evaluate_is(register, tiny_models, sst2_files, tmp_path):
    """Its metrics go into the run summary, metrics.json, the export record and the card's evaluation table exactly
    as the built-in `evaluate` stage's do; card tags declared by a stage that ran reach the card."""
    register("measure_twin", MeasureConfig, measure, changes_model=False, produces_metrics=True)
    register("zero_biases_tagged", ZeroBiasesConfig, zero_biases, card_tags=("bias-free",))
    stages = [{"type": "evaluate", "name": "before"}, "zero_biases_tagged", {"type": "evaluate", "name": "after"},
              {"type": "measure_twin", "name": "twin"}, {"type": "export", "verify": False}]
    result = run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)), tmp_path / "o")

    summary = {r["name"]: r["metrics"] for r in result["metrics"]}
    assert list(summary) == ["before", "after", "twin"]
    assert summary["twin"] == summary["after"] and summary["twin"]["eval_samples"] == 32
    written = {r["stage"]: r for r in json.loads((tmp_path / "o" / "metrics.json").read_text())}
    assert list(written) == ["before", "after", "twin"]
    assert written["twin"]["metrics"] == written["after"]["metrics"]
    assert written["twin"]["model"] == written["after"]["model"]
    record = json.loads((tmp_path / "o" / "export.json").read_text())
    assert record["run_metrics"] == summary["twin"]  # the last measurement of the exported model
    card = (tmp_path / "o" / "README.md").read_text()
    rows = _card_rows(card)
    assert list(rows) == ["before", "after", "twin"] and rows["twin"] == rows["after"]
    tags = _card_tags(card)
    assert "bias-free" in tags and "zero_biases_tagged" in tags  # declared tag, then the stage type (a method tag)
    assert "measure_twin" not in tags and "evaluate" not in tags  # stages that only measure are not methods


def test_without_the_flag_a_stage_s_metrics_stay_in_its_own_record(register, tiny_models, sst2_files, tmp_path):
    register("measure_quietly", MeasureConfig, measure, changes_model=False)
    stages = ["measure_quietly", {"type": "export", "verify": False}]
    result = run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=stages)), tmp_path / "o")
    assert result["metrics"] == [] and json.loads((tmp_path / "o" / "metrics.json").read_text()) == []
    assert result["stages"][0]["metrics"]["eval_samples"] == 32
    assert _card_rows((tmp_path / "o" / "README.md").read_text()) == {}


class IntegerCodesConfig(StageConfig):
    """Store the weights as integer codes (imitates `quantize`'s untrainable output)."""


def test_no_stage_that_trains_every_weight_follows_an_untrainable_output(register, tiny_models, sst2_files):
    register("integer_codes", IntegerCodesConfig, lambda state, config, context: state,
             untrainable_output="stored them as integer codes, which cannot be trained in place")
    for follower, entry in (("finetune", "finetune"), ("distill", {"type": "distill", "student": {"every": 2}})):
        with pytest.raises(RecipeError) as refused:
            validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=["integer_codes", entry]))
        assert refused.value.key == "stages[1]" and "\n" not in str(refused.value)
        assert refused.value.message == (
            f"a {follower} stage trains every weight, but stage 'integer_codes' before it stored them as integer "
            f"codes, which cannot be trained in place; put the {follower} stage before 'integer_codes'")
        # The built-in stage it imitates is refused the same way, in the same words but its own reason.
        with pytest.raises(RecipeError) as builtin:
            validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=["quantize", entry]))
        assert builtin.value.key == "stages[1]"
        assert builtin.value.message.startswith(f"a {follower} stage trains every weight, but stage 'quantize' before "
                                                "it quantized them with bitsandbytes")
    # Trained before it, or followed by stages that do not train every weight: accepted.
    validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=["finetune", "integer_codes", "evaluate"]))


class FinalCopyConfig(StageConfig):
    """Write the final folder its own way (imitates `export`)."""


def final_copy(state, config, context):
    (context.output_dir / "final.txt").write_text(state.description)
    return state


def test_a_stage_that_writes_the_final_output_replaces_the_default_export(register, tiny_models, sst2_files,
                                                                          tmp_path):
    register("final_copy", FinalCopyConfig, final_copy, changes_model=False, writes_final_output=True)
    assert STAGES["final_copy"].cacheable is False  # it writes outside its stage folder
    with pytest.raises(RecipeError, match=r"stages\[1\]: stage 'final_copy' must be the last stage"):
        validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=["final_copy", "evaluate"]))
    result = run_recipe(validate_recipe(tiny_recipe(tiny_models("bert"), sst2_files, stages=["final_copy"])),
                        tmp_path / "o")
    assert [r["name"] for r in result["stages"]] == ["final_copy"]  # no export appended
    assert (tmp_path / "o" / "final.txt").read_text() == str(tiny_models("bert"))
    assert not (tmp_path / "o" / "export.json").exists() and not (tmp_path / "o" / "stages" / "final_copy" /
                                                                   "stage.json").exists()


def test_flags_are_checked_when_registered():
    with pytest.raises(ValueError, match="never cached"):
        register_stage("bad_final", StageConfig, writes_final_output=True, cacheable=True)
    with pytest.raises(TypeError, match="card_tags must be a tuple of non-empty strings"):
        register_stage("bad_tags", StageConfig, card_tags="quantized")
    assert "bad_final" not in STAGES and "bad_tags" not in STAGES
