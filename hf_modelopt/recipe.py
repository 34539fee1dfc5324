"""Recipes: YAML files validated into the same typed configs that Python users build.

A recipe names the model, the task, the data, the `TrainingArguments` and an ordered list of stages. It
can `extends:` another recipe (paths relative to the file that says it) and be overridden from the
command line (`--set training.learning_rate=3e-5`). Every problem is reported as one `RecipeError` line
naming the file, the key path and what was expected, before any work starts.
"""

from __future__ import annotations

import difflib
import functools
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .data import DataConfig
from .errors import RecipeError, UserError  # noqa: F401  (RecipeError: re-exported)
from .modeling import ModelConfig, looks_like_local_path  # noqa: F401  (re-exported)
from .stages import STAGES, StageConfig, load_builtin_stages
from .tasks import TASKS as TASK_REGISTRY

TASKS = tuple(TASK_REGISTRY)  # the registered task names


class StrictModel(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Stage(BaseModel):
    """One validated entry of `stages:`: its registered type, unique name and typed config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    type: str
    name: str
    config: StageConfig


class Recipe(StrictModel):
    description: str = Field("", description="What this recipe does, in a sentence or two.")
    model: ModelConfig
    task: Literal[TASKS] = Field(description="What the model does: one of the registered tasks "
                                 "(`hf_modelopt.tasks.TASKS`).")
    data: DataConfig
    training: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of `transformers.TrainingArguments`."
    )
    stages: list[dict[str, Any] | str] = Field(min_length=1, description="Ordered list of stages to run.")
    # Filled by `load_recipe`, never read from YAML.
    source: str = Field("<python>", exclude=True)
    resolved_stages: list[Stage] = Field(default_factory=list, exclude=True)

    def to_yaml(self) -> str:
        """The fully resolved recipe (extends and --set applied), reloadable as a recipe."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude={"source", "resolved_stages"}), sort_keys=False)


# --------------------------------------------------------------------------- YAML, extends, --set


def _read_yaml(path: Path, source_for_errors: str) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(source_for_errors, "", f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(str(path), "", f"invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), "", f"expected a mapping of keys at the top, got {type(data).__name__}")
    return data


def _merge(base: dict, override: dict, origins: dict, source: str, prefix: tuple = ()) -> dict:
    """Deep-merge mappings (lists and scalars are replaced whole), recording which file set each key."""
    merged = dict(base)
    for key, value in override.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, origins, source, path)
        else:
            merged[key] = value
            for known in [p for p in origins if p[: len(path)] == path]:
                del origins[known]
        origins[path] = source
    return merged


def _load_with_extends(path: Path, origins: dict, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve() if chain else path
    if path.resolve() in [p.resolve() for p in chain]:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise RecipeError(str(chain[0]), "extends", f"recipes extend each other in a cycle: {cycle}")
    data = _read_yaml(path, str(chain[-1]) if chain else str(path))
    _anchor_data_dir(data, path)
    parent = data.pop("extends", None)
    if parent is None:
        return _merge({}, data, origins, str(path))
    if not isinstance(parent, str):
        raise RecipeError(str(path), "extends", f"expected a recipe path, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.is_file():
        raise RecipeError(str(path), "extends", f"file not found: {parent_path}")
    base = _load_with_extends(parent_path, origins, chain + (path,))
    return _merge(base, data, origins, str(path))


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError("--set", text, "expected KEY=VALUE, for example training.learning_rate=3e-5")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _anchor_data_dir(data: dict, recipe_file: Path) -> None:
    """A relative `data.data_dir` written in a recipe file resolves against that file's folder, as `extends:` does,
    so that a recipe finds its data from any current directory (one set with --set stays relative to it)."""
    section = data.get("data")
    value = section.get("data_dir") if isinstance(section, dict) else None
    if isinstance(value, str) and not Path(value).expanduser().is_absolute():
        section["data_dir"] = str((recipe_file.parent / value).resolve())


def _default_data_dir(data: dict, recipe_file: Path) -> None:
    """No file sets `data.data_dir` and $HF_MODELOPT_DATA_DIR is unset: the recipe file's own folder."""
    from .data import DATA_DIR_VARIABLE

    section = data.get("data")
    if isinstance(section, dict) and "data_dir" not in section and DATA_DIR_VARIABLE not in os.environ:
        section["data_dir"] = str(recipe_file.resolve().parent)


def _apply_override(data: dict, keys: list[str], value: Any, origins: dict) -> None:
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError("--set", where, f"expected a list index below {len(node)}")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError("--set", where, f"is a {type(node).__name__}, not a mapping")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise RecipeError("--set", ".".join(keys), f"expected a list index below {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value
    origins[tuple(int(k) if k.isdigit() else k for k in keys)] = f"--set {'.'.join(keys)}"


# --------------------------------------------------------------------------- validation


def _key_path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _origin(origins: dict, loc: tuple, default: str) -> str:
    for length in range(len(loc), 0, -1):
        if loc[:length] in origins:
            return origins[loc[:length]]
    return default


def _describe(error: dict, model: type[BaseModel] | None) -> str:
    kind, got = error["type"], error.get("input")
    if kind == "extra_forbidden":
        allowed = sorted(model.model_fields) if model is not None else []
        close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown key{hint}; expected one of: {', '.join(allowed)}"
    if kind == "missing":
        return "required key is missing"
    message = error["msg"][0].lower() + error["msg"][1:]
    message = message.removeprefix("value error, ")
    return f"{message}, got {got!r}" if kind != "value_error" else message


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `loc` (for listing the allowed keys)."""
    model: Any = root
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *typing.get_args(annotation)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _raise_first(err: ValidationError, model: type[BaseModel], prefix: tuple, origins: dict, source: str):
    error = err.errors()[0]
    loc = prefix + tuple(error["loc"])
    raise RecipeError(_origin(origins, loc, source), _key_path(loc), _describe(error, _model_at(model, error["loc"])))


# Ranges `TrainingArguments` itself does not check (a negative learning rate trains happily, uphill).
TRAINING_ARGUMENT_BOUNDS = {
    "learning_rate": {"ge": 0},
    "num_train_epochs": {"gt": 0},
    "max_steps": {"ge": -1},  # -1: use num_train_epochs
    "per_device_train_batch_size": {"gt": 0},
    "per_device_eval_batch_size": {"gt": 0},
    "gradient_accumulation_steps": {"gt": 0},
    "warmup_steps": {"ge": 0},
    "weight_decay": {"ge": 0},
    "max_grad_norm": {"ge": 0},
    "save_total_limit": {"gt": 0},
    "logging_steps": {"gt": 0},
    "save_steps": {"gt": 0},
    "eval_steps": {"gt": 0},
    "seed": {"ge": 0},
    "label_smoothing_factor": {"ge": 0, "lt": 1},
    "adam_beta1": {"ge": 0, "lt": 1},
    "adam_beta2": {"ge": 0, "lt": 1},
    "adam_epsilon": {"gt": 0},
    "dataloader_num_workers": {"ge": 0},
}
# TrainingArguments that would write outside the output folder or put a secret into the exported recipe.yaml.
REFUSED_TRAINING_ARGUMENTS = {
    "output_dir": "is set by hf-modelopt (OUTPUT/stages/<name>/); pass --output-dir instead",
    "hub_token": "credentials do not belong in a recipe (it is copied next to the exported model); "
                 "use `hf auth login` or $HF_TOKEN",
    "push_to_hub": "hf-modelopt writes only into --output-dir; upload the exported folder once the run is done",
}


@functools.cache
def training_arguments_model() -> type[BaseModel]:
    """A strict pydantic mirror of `transformers.TrainingArguments`: every field optional, unknown keys rejected."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    fields = {}
    for name, field in TrainingArguments.__dataclass_fields__.items():
        if not field.init:
            continue
        annotation = hints.get(name, Any)
        try:
            create_model("_Probe", probe=(annotation | None, None))
        except Exception:  # a type pydantic cannot check (callables, ...): accept as is
            annotation = Any
        if name in TRAINING_ARGUMENT_BOUNDS and annotation is not Any:
            annotation = Annotated[annotation, Field(**TRAINING_ARGUMENT_BOUNDS[name])]
        fields[name] = (annotation | None, None)
    return create_model("TrainingArgumentsConfig", __config__=ConfigDict(extra="forbid"), **fields)


def validate_training_arguments(values: dict[str, Any], prefix: tuple, origins: dict, source: str) -> dict:
    """Check keys and types against `TrainingArguments`; return the values converted to their types."""
    model = training_arguments_model()
    for key, reason in REFUSED_TRAINING_ARGUMENTS.items():
        if key in values:
            raise RecipeError(_origin(origins, prefix + (key,), source), _key_path(prefix + (key,)), reason)
    try:
        checked = model.model_validate(values)
    except ValidationError as err:
        _raise_first(err, model, prefix, origins, source)
    return checked.model_dump(exclude_unset=True)


def validate_recipe(data: dict[str, Any], source: str = "<python>", origins: dict | None = None) -> Recipe:
    """Validate a recipe mapping into a `Recipe` whose stages carry their typed configs."""
    origins = origins or {}
    load_builtin_stages()
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        _raise_first(err, Recipe, (), origins, source)
    recipe.training = validate_training_arguments(recipe.training, ("training",), origins, source)

    used_names: set[str] = set()
    stages = []
    for index, entry in enumerate(recipe.stages):
        loc = ("stages", index)
        where = _origin(origins, loc, source)
        if isinstance(entry, str):  # `- finetune` is short for `- type: finetune`
            entry = {"type": entry}
        if not isinstance(entry, dict) or "type" not in entry:
            raise RecipeError(where, _key_path(loc), f"expected a mapping with a 'type' key, got {entry!r}")
        entry = dict(entry)
        kind = entry.pop("type")
        if kind not in STAGES:
            close = difflib.get_close_matches(str(kind), list(STAGES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(where, _key_path(loc + ("type",)),
                              f"unknown stage {kind!r}{hint}; expected one of: {', '.join(STAGES)}")
        config_cls = STAGES[kind].config_cls
        try:
            config = config_cls.model_validate(entry)
        except ValidationError as err:
            _raise_first(err, config_cls, loc, origins, source)
        if getattr(config, "training", None) is not None:
            config.training = validate_training_arguments(config.training, loc + ("training",), origins, source)
        name = config.name or kind
        if name in used_names:  # a second `evaluate` becomes `evaluate-2`, unless named
            name = next(f"{name}-{n}" for n in range(2, len(recipe.stages) + 2) if f"{name}-{n}" not in used_names)
        if "/" in name or "\\" in name or name.startswith("."):  # OUTPUT/stages/<name> must stay inside OUTPUT
            raise RecipeError(where, _key_path(loc + ("name",)),
                              f"stage names cannot contain '/' or '\\' or start with '.': {name!r}")
        try:
            config.check_after(stages)
        except ValueError as err:
            raise RecipeError(where, _key_path(loc), str(err)) from None
        used_names.add(name)
        stages.append(Stage(type=kind, name=name, config=config))
    recipe.resolved_stages = stages
    recipe.source = source
    return recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, follow `extends:`, apply `--set KEY=VALUE` overrides and validate it."""
    path = Path(path)
    origins: dict[tuple, str] = {}
    data = _load_with_extends(path, origins)
    for text in overrides:
        keys, value = _parse_override(text)
        _apply_override(data, keys, value, origins)
    _default_data_dir(data, path)
    return validate_recipe(data, str(path), origins)
