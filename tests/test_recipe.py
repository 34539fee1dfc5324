from pathlib import Path

import pytest
import yaml

from hf_modelopt.recipe import RecipeError, load_recipe, validate_recipe
from hf_modelopt.stages.train import FinetuneConfig

from .conftest import REPO, tiny_recipe


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# recipes/accelerate/ holds `accelerate launch` configs, not recipes: left out, not skipped.
SHIPPED_RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.resolved_stages and recipe.description


def test_stages_become_typed_configs(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path, tmp_path))
    assert [s.name for s in recipe.resolved_stages] == ["before", "finetune", "after", "export"]
    assert isinstance(recipe.resolved_stages[1].config, FinetuneConfig)


def test_repeated_stage_types_get_unique_names(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path, tmp_path, stages=["evaluate", "finetune", "evaluate"]))
    assert [s.name for s in recipe.resolved_stages] == ["evaluate", "finetune", "evaluate-2"]


def test_extends_merges_and_set_overrides(tmp_path):
    base = write(tmp_path / "base.yaml", tiny_recipe(tmp_path, tmp_path))
    child = write(tmp_path / "sub" / "child.yaml", {"extends": "../base.yaml", "training": {"learning_rate": 0.5}})
    recipe = load_recipe(child, ["training.seed=7", "data.max_length=16", "stages.1.training.max_steps=1"])
    assert recipe.training["learning_rate"] == 0.5  # from the child
    assert recipe.training["max_steps"] == 3  # kept from the parent
    assert recipe.training["seed"] == 7 and recipe.data.max_length == 16
    assert recipe.resolved_stages[1].config.training == {"max_steps": 1}
    assert base.is_file()


def test_set_values_are_coerced_to_the_field_type(tmp_path):
    path = write(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path))
    recipe = load_recipe(path, ["training.learning_rate=3e-5"])  # YAML reads 3e-5 as a string
    assert recipe.training["learning_rate"] == pytest.approx(3e-5)


def test_resolved_recipe_round_trips(tmp_path):
    path = write(tmp_path / "r.yaml", tiny_recipe(tmp_path, tmp_path))
    recipe = load_recipe(path, ["training.seed=3"])
    again = write(tmp_path / "resolved.yaml", recipe.to_yaml())
    assert load_recipe(again).model_dump() == recipe.model_dump()


def error_of(tmp_path, data, overrides=(), name="r.yaml") -> RecipeError:
    path = write(tmp_path / name, data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    assert "\n" not in str(info.value)  # one line
    return info.value


def test_misspelled_key_is_named_with_a_suggestion(tmp_path):
    data = tiny_recipe(tmp_path, tmp_path)
    data["data"]["max_lenght"] = 12
    err = error_of(tmp_path, data)
    assert err.key == "data.max_lenght" and "did you mean 'max_length'" in err.message
    assert err.source.endswith("r.yaml")


def test_misspelled_training_argument(tmp_path):
    data = tiny_recipe(tmp_path, tmp_path)
    data["training"]["learnig_rate"] = 1e-4
    err = error_of(tmp_path, data)
    assert err.key == "training.learnig_rate" and "learning_rate" in err.message


def test_wrong_type_names_key_and_value(tmp_path):
    data = tiny_recipe(tmp_path, tmp_path)
    data["training"]["num_train_epochs"] = "three"
    err = error_of(tmp_path, data)
    assert err.key == "training.num_train_epochs" and "'three'" in err.message


def test_wrong_type_in_stage(tmp_path):
    data = tiny_recipe(tmp_path, tmp_path)
    data["stages"][1]["training"] = {"per_device_train_batch_size": "big"}
    err = error_of(tmp_path, data)
    assert err.key == "stages[1].training.per_device_train_batch_size"


def test_unknown_stage_lists_known_ones(tmp_path):
    data = tiny_recipe(tmp_path, tmp_path, stages=[{"type": "finetune"}, {"type": "evalute"}])
    err = error_of(tmp_path, data)
    assert err.key == "stages[1].type" and "did you mean 'evaluate'" in err.message and "finetune" in err.message


def test_unknown_task_and_missing_model(tmp_path):
    data = tiny_recipe(tmp_path, tmp_path, task="translation")
    assert error_of(tmp_path, data).key == "task"
    data = tiny_recipe(tmp_path, tmp_path)
    del data["model"]
    err = error_of(tmp_path, data)
    assert err.key == "model" and "missing" in err.message


def test_error_names_the_file_that_set_the_key(tmp_path):
    parent = tiny_recipe(tmp_path, tmp_path)
    parent["training"]["warmup_ratio"] = "lots"
    write(tmp_path / "parent.yaml", parent)
    err = error_of(tmp_path, {"extends": "parent.yaml"}, name="child.yaml")
    assert err.source.endswith("parent.yaml") and err.key == "training.warmup_ratio"
    err = error_of(tmp_path, tiny_recipe(tmp_path, tmp_path), overrides=["data.max_length=none-such"])
    assert err.source == "--set data.max_length"


def test_output_dir_is_not_a_training_argument(tmp_path):
    data = tiny_recipe(tmp_path, tmp_path)
    data["training"]["output_dir"] = "/elsewhere"
    assert "--output-dir" in error_of(tmp_path, data).message


def test_file_problems(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    assert "invalid YAML at line 2" in str(error_of(tmp_path, "model: {\n  - : ]"))
    assert "extends" == error_of(tmp_path, {"extends": "missing.yaml"}).key
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_bad_override_syntax(tmp_path):
    err = error_of(tmp_path, tiny_recipe(tmp_path, tmp_path), overrides=["training.seed"])
    assert "KEY=VALUE" in err.message


def test_yaml_is_loaded_safely(tmp_path):
    err = error_of(tmp_path, "model: !!python/object/apply:os.system ['echo hacked']\n")
    assert "invalid YAML" in str(err)
