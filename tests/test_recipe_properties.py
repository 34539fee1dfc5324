"""Property-based tests of the recipe parser: load_recipe, `--set` overrides, `extends:` merges."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_modelopt.recipe import ModelConfig, Recipe, RecipeError, load_recipe, training_arguments_model
from hf_modelopt.stages.train import FinetuneConfig
from hf_modelopt.tasks import TASKS

# The parser is pure Python (no model, no data): many examples are cheap. tmp_path is reused across
# examples on purpose: every example writes its own files first.
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

words = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True).filter(lambda w: yaml.safe_load(w) == w)
text = st.text(st.characters(categories=("L", "N", "P", "Zs")), max_size=40)
training = st.fixed_dictionaries({}, optional={
    "learning_rate": st.floats(0, 1, allow_nan=False),
    "seed": st.integers(0, 2**31 - 1),
    "max_steps": st.integers(1, 10**6),
    "per_device_train_batch_size": st.integers(1, 512),
    "weight_decay": st.floats(0, 1, allow_nan=False),
    "lr_scheduler_type": st.sampled_from(["linear", "cosine", "constant"]),
})
stage = st.one_of(
    st.sampled_from(["evaluate", "finetune"]),
    st.builds(lambda kind, name: {"type": kind, "name": name}, st.sampled_from(["evaluate", "finetune"]), words),
    st.builds(lambda config: {"type": "finetune", "training": config}, training),
)
recipes = st.fixed_dictionaries({
    "description": text,
    "model": st.fixed_dictionaries({"name_or_path": words}, optional={"trust_remote_code": st.booleans()}),
    "task": st.sampled_from(["text-classification", "causal-lm"]),
    "data": st.fixed_dictionaries({"train_file": words.map(lambda w: f"{w}.tsv")}, optional={
        "text_column": words, "max_length": st.integers(1, 4096), "max_train_samples": st.integers(1, 10**6),
        "eval_fraction": st.floats(0.01, 0.99, allow_nan=False)}),
    "training": training,
    # `export` only last: anywhere else is refused (test_a_stage_after_export_is_refused).
    "stages": st.builds(lambda stages, export: stages + ["export"] * export, st.lists(stage, min_size=1, max_size=4),
                        st.booleans()).filter(
        lambda stages: len({s["name"] for s in stages if isinstance(s, dict) and "name" in s})
        == len([s for s in stages if isinstance(s, dict) and "name" in s])),
})


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@SETTINGS
@given(data=recipes)
def test_resolved_recipe_reloads_to_the_same_recipe(tmp_path, data):
    recipe = load_recipe(write(tmp_path / "r.yaml", data))
    again = load_recipe(write(tmp_path / "resolved.yaml", yaml.safe_load(recipe.to_yaml())))
    assert again.model_dump() == recipe.model_dump()
    assert [(s.type, s.name, s.config) for s in again.resolved_stages] == \
        [(s.type, s.name, s.config) for s in recipe.resolved_stages]


@SETTINGS
@given(data=recipes, position=st.integers(0, 4))
def test_a_stage_after_export_is_refused(tmp_path, data, position):
    stages = [s for s in data["stages"] if s != "export"]
    position %= len(stages)
    stages.insert(position, "export")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", {**data, "stages": stages}))
    assert info.value.key == f"stages[{position + 1}]" and "'export' must be the last stage" in info.value.message


@SETTINGS
@given(data=recipes, key=st.sampled_from(["learning_rate", "weight_decay", "max_grad_norm", "adam_epsilon"]),
       value=st.sampled_from([float("inf"), float("-inf"), float("nan")]), in_stage=st.booleans())
def test_non_finite_numbers_are_refused_and_named(tmp_path, data, key, value, in_stage):
    if in_stage:
        data["stages"][0] = {"type": "finetune", "training": {key: value}}
    else:
        data["training"] = {**data["training"], key: value}
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", data))
    assert info.value.key == ("stages[0].training." if in_stage else "training.") + key
    assert info.value.message == f"must be a finite number, got {value}"


SECTIONS = {  # where an unknown key can go -> (path prefix in the error, the keys that are allowed there)
    "top": ((), set(Recipe.model_fields) | {"extends"}),
    "model": (("model",), set(ModelConfig.model_fields)),
    "data": (("data",), None),  # the keys of the recipe's task's data settings (`Task.data_config`)
    "training": (("training",), set(training_arguments_model().model_fields)),
    "stage": (("stages", 0), set(FinetuneConfig.model_fields) | {"type"}),
}


@SETTINGS
@given(data=recipes, section=st.sampled_from(sorted(SECTIONS)), key=words, value=st.one_of(st.integers(), words))
def test_unknown_keys_are_always_rejected_and_named(tmp_path, data, section, key, value):
    prefix, allowed = SECTIONS[section]
    if allowed is None:
        allowed = set(TASKS[data["task"]].data_config.model_fields)
    if key in allowed:
        return
    if section == "top":
        data[key] = value
    elif section == "stage":
        data["stages"][0] = {"type": "finetune", key: value}
    else:
        data[section] = {**data[section], key: value}
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "r.yaml", data))
    expected = key if not prefix else f"{prefix[0]}[{prefix[1]}].{key}" if len(prefix) == 2 else f"{prefix[0]}.{key}"
    assert info.value.key == expected and "unknown key" in info.value.message
    assert "\n" not in str(info.value)


@SETTINGS
@given(data=recipes, seed=st.integers(0, 2**31 - 1), max_length=st.integers(1, 4096), column=words,
       steps=st.integers(1, 10**6), index=st.integers(0, 4))
def test_set_overrides_land_where_they_say(tmp_path, data, seed, max_length, column, steps, index):
    index %= len(data["stages"])
    overrides = [f"training.seed={seed}", f"data.max_length={max_length}", f"data.text_column={column}",
                 f"stages.{index}.training.max_steps={steps}"]
    if not isinstance(data["stages"][index], dict) or data["stages"][index]["type"] != "finetune":
        data["stages"][index] = {"type": "finetune"}
    recipe = load_recipe(write(tmp_path / "r.yaml", data), overrides)
    assert recipe.training["seed"] == seed and recipe.data.max_length == max_length
    assert recipe.data.text_column == column
    assert recipe.resolved_stages[index].config.training["max_steps"] == steps
    others = {k: v for k, v in data["training"].items() if k != "seed"}
    assert {k: v for k, v in recipe.training.items() if k != "seed"} == others  # nothing else moved


@SETTINGS
@given(parent=recipes, child_training=training, child_data=st.fixed_dictionaries({}, optional={
    "max_length": st.integers(1, 4096), "text_column": words}),
    child_stages=st.none() | st.lists(st.sampled_from(["evaluate", "finetune"]), min_size=1, max_size=3))
def test_extends_merges_mappings_key_by_key_and_replaces_lists(tmp_path, parent, child_training, child_data,
                                                               child_stages):
    write(tmp_path / "parent.yaml", parent)
    child = {"extends": "parent.yaml", "training": child_training, "data": child_data}
    if child_stages is not None:
        child["stages"] = child_stages
    recipe = load_recipe(write(tmp_path / "child.yaml", child))
    assert recipe.training == {**parent["training"], **child_training}
    merged_data = {**parent["data"], **child_data}
    assert recipe.data.model_dump(include=set(merged_data)) == merged_data
    assert recipe.stages == (child_stages if child_stages is not None else parent["stages"])
    assert recipe.model.name_or_path == parent["model"]["name_or_path"]
