"""Recipes: YAML files validated into the same typed configs that Python users build.

A recipe names the model, the task, the data, the `TrainingArguments` and an ordered list of stages. It
can `extends:` another recipe (paths relative to the file that says it) and be overridden from the
command line (`--set training.learning_rate=3e-5`). Every problem is reported as one `RecipeError` line
naming the file, the key path and what was expected, before any work starts.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, create_model, field_validator

from .data import DataConfig
from .errors import RecipeError, UserError, clip, excerpt  # noqa: F401  (RecipeError: re-exported)
from .modeling import ModelConfig, looks_like_local_path  # noqa: F401  (re-exported)
from .stages import STAGES, RunSettings, Stage, load_builtin_stages  # noqa: F401  (Stage: re-exported)
from .tasks import TASKS

MAX_STAGE_NAME = 100  # characters: a folder name under OUTPUT/stages/ (file systems allow 255 bytes)


class StrictModel(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default. `inf` / `nan` written as text
    # (YAML reads `--set x=inf` as a string, which pydantic would turn into a float) are refused like `.inf`.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Recipe(StrictModel):
    description: str = Field("", description="What this recipe does, in a sentence or two.")
    model: ModelConfig
    task: Literal[tuple(TASKS)] = Field(description="What the model does: one of the registered tasks "
                                 "(`hf_modelopt.tasks.TASKS`).")
    # The task's own `DataConfig` subclass (`Task.data_config`), validated as such by `validate_recipe`; kept
    # whole when dumped (SerializeAsAny: pydantic would otherwise write only the base class's keys).
    data: SerializeAsAny[DataConfig] = Field(description="Where the data is and how the task reads it: the keys "
                                             "of the task's data settings (`hf_modelopt.tasks`' `...Data` classes).")
    training: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of `transformers.TrainingArguments`."
    )
    stages: list[dict[str, Any] | str] = Field(min_length=1, description="Ordered list of stages to run.")
    # Filled by `load_recipe`, never read from YAML.
    source: str = Field("<python>", exclude=True)
    resolved_stages: list[Stage] = Field(default_factory=list, exclude=True)

    @field_validator("data", mode="before")
    @classmethod
    def _data_of_task(cls, value, info):
        # A Recipe built in Python (or `recipe.data = ...`) gets its task's data class too, as `validate_recipe`'s.
        task = TASKS.get(info.data.get("task"))
        if task is None or not isinstance(value, (dict, DataConfig)):
            return value
        return task.data_settings(value) if isinstance(value, DataConfig) else task.data_config.model_validate(value)

    def to_yaml(self) -> str:
        """The fully resolved recipe (extends and --set applied), reloadable as a recipe."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude={"source", "resolved_stages"}), sort_keys=False)

    def run_settings(self) -> RunSettings:
        """What the stages read of this recipe (`hf_modelopt.stages.RunSettings`): the stages never see the recipe."""
        return RunSettings(model=self.model, task=self.task, data=self.data, training=dict(self.training),
                           source=self.source, description=self.description,
                           resolved_stages=tuple(self.resolved_stages), recipe_yaml=self.to_yaml())


# --------------------------------------------------------------------------- YAML, extends, --set


# Bounds on what a recipe may be, checked while it is read: a recipe is a page of settings, and anything
# far larger is a mistake or an attack (a 500-byte alias bomb expands to billions of nodes; 20,000 nested
# brackets overflow every recursive walk after the parser). Documented in docs/recipes.md.
MAX_RECIPE_BYTES = 1 << 20  # 1 MiB per file
MAX_YAML_DEPTH = 64  # nested mappings / lists
MAX_YAML_NODES = 100_000  # nodes after aliases are expanded


class _BoundedLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses, while composing, nesting deeper than `MAX_YAML_DEPTH` and documents whose
    aliases expand to more than `MAX_YAML_NODES` nodes.

    PyYAML's composer recurses once per nesting level, so the depth is checked before descending (no
    RecursionError). Aliases are not copied by PyYAML (one node, many references) but every consumer after it
    (merging, pydantic, dumping) walks them expanded: each node's expanded size is counted once, from its
    children's, so the count costs one step per node written in the file.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._expanded: dict[int, int] = {}  # id(node) -> its node count with aliases expanded

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)  # the anchored node itself (PyYAML refuses unknown names)
            if id(node) not in self._expanded:  # its anchor is still open: `&a [*a]`
                raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it (a "
                                                  "recursive structure)", node.start_mark)
            return node
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                              self.peek_event().start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        size = self._expanded[id(node)] = 1 + sum(self._expanded[id(child)] for child in children)
        if size > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"expands to more than {MAX_YAML_NODES:,} values once its "
                                              "aliases (*name) are expanded", node.start_mark)
        return node


def parse_yaml(text: str):
    """`yaml.safe_load` within the bounds above; raises `yaml.YAMLError`."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"invalid YAML{where}: {getattr(err, 'problem', None) or err}"


def _read_yaml(path: Path, source_for_errors: str) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(source_for_errors, "", f"recipe file not found: {path}")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(str(path), "", f"{size:,} bytes: a recipe is at most {MAX_RECIPE_BYTES:,} bytes")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(str(path), "", f"not UTF-8 text: byte {err.start} is {raw[err.start:err.start + 1]!r}; "
                          "save the recipe as UTF-8") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        raise RecipeError(str(path), "", _yaml_problem(err)) from None
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
        raise RecipeError(str(path), "extends", f"expected a recipe path, got {excerpt(parent)}")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.is_file():
        raise RecipeError(str(path), "extends", f"file not found: {parent_path}")
    base = _load_with_extends(parent_path, origins, chain + (path,))
    return _merge(base, data, origins, str(path))


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError("--set", text, "expected KEY=VALUE, for example training.learning_rate=3e-5")
    if not raw.strip():
        return key.strip().split("."), None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"--set {clip(key.strip())}", "", f"the value is {len(raw):,} characters: at most "
                          f"{MAX_RECIPE_BYTES:,}")
    try:
        return key.strip().split("."), parse_yaml(raw)
    except yaml.YAMLError as err:
        raise RecipeError(f"--set {clip(key.strip())}", "", f"{_yaml_problem(err)} in {excerpt(raw)}; "
                          "quote a value that is text, e.g. --set 'data.text_column=\"[x\"'") from None


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
    return f"{message}, got {excerpt(got)}" if kind != "value_error" else message


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
    # Above 10 no optimizer Trainer offers converges (fine-tuning uses 1e-6..1e-3): a typo such as 5e2 for 5e-2.
    "learning_rate": {"ge": 0, "le": 10},
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
    return create_model("TrainingArgumentsConfig", __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
                        **fields)


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


def refuse_non_finite(value: Any, loc: tuple, origins: dict, source: str) -> None:
    """Refuse `.inf` / `.nan` anywhere in a recipe, typed field or not (`lr_scheduler_kwargs`, ...).

    No setting of any stage or of `TrainingArguments` means anything when infinite: `learning_rate: .inf` trains
    to all-NaN weights without an error from torch or Trainer. Iterative (an explicit stack): nesting is
    bounded by the YAML loader, but a Python caller's data is not.
    """
    stack = [(loc, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise RecipeError(_origin(origins, where, source), _key_path(where),
                              f"must be a finite number, got {item}")
        if isinstance(item, dict):
            stack.extend((where + (key,), child) for key, child in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((where + (index,), child) for index, child in enumerate(item))


def scheduler_arguments(scheduler: str) -> tuple[str, ...] | None:
    """The keys `lr_scheduler_kwargs` may hold for `lr_scheduler_type: scheduler`, read from the signature of what
    transformers' `get_scheduler` calls (None: it accepts any keyword, nothing to check)."""
    import torch
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, GreedyLR, SchedulerType

    kind = SchedulerType(scheduler)
    if kind in (SchedulerType.CONSTANT, SchedulerType.CONSTANT_WITH_WARMUP):
        return ()  # get_scheduler calls these without the kwargs: any key would be silently ignored
    # These two pass **kwargs on to a scheduler class: its constructor is the signature that counts.
    target = {SchedulerType.REDUCE_ON_PLATEAU: torch.optim.lr_scheduler.ReduceLROnPlateau,
              SchedulerType.GREEDY: GreedyLR}.get(kind, TYPE_TO_SCHEDULER_FUNCTION[kind])
    parameters = inspect.signature(target).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    # Trainer passes the optimizer and the step counts itself; passing them again is a TypeError mid-run.
    passed_by_trainer = ("self", "optimizer", "num_warmup_steps", "num_training_steps")
    return tuple(p.name for p in parameters if p.name not in passed_by_trainer)


def check_scheduler_kwargs(training: dict[str, Any], prefix: tuple, origins: dict, source: str) -> None:
    """Every key of `training["lr_scheduler_kwargs"]` must be an argument of the chosen scheduler: transformers
    hands them over only when the optimizer is built, after the first stages have run."""
    kwargs = training.get("lr_scheduler_kwargs")
    scheduler = training.get("lr_scheduler_type") or "linear"  # TrainingArguments' default
    scheduler = getattr(scheduler, "value", scheduler)
    loc = prefix + ("lr_scheduler_kwargs",)
    if isinstance(kwargs, str):  # TrainingArguments also takes it as a JSON string
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else {}
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise RecipeError(_origin(origins, loc, source), _key_path(loc),
                              f"expected a mapping (or its JSON text), got {excerpt(training['lr_scheduler_kwargs'])}")
    if not kwargs:
        return
    allowed = scheduler_arguments(scheduler)
    if allowed is None:
        return
    for key in kwargs:
        if key not in allowed:
            takes = f"expected one of: {', '.join(allowed)}" if allowed else (
                "that scheduler takes none (transformers' get_scheduler passes it no lr_scheduler_kwargs)")
            raise RecipeError(_origin(origins, loc + (key,), source), _key_path(loc + (key,)),
                              f"unknown argument of the {scheduler!r} learning-rate scheduler; {takes}")


def _validate_data(data: dict, task: str, origins: dict, source: str):
    """`data:` as the task's data settings (`Task.data_config`): a key another task reads (`doc_stride` in a
    classification recipe) is refused naming the task that reads it, any other unknown key like a typo."""
    data_class = TASKS[task].data_config
    try:
        return data_class.model_validate(data)
    except ValidationError as err:
        error = err.errors()[0]
        key = error["loc"][-1] if error["loc"] else None
        readers = [name for name, other in TASKS.items() if key in other.data_config.model_fields]
        if error["type"] == "extra_forbidden" and readers:
            loc = ("data", *error["loc"])
            raise RecipeError(_origin(origins, loc, source), _key_path(loc),
                              f"unknown key for a {task} recipe: only {', '.join(readers)} recipes read it") from None
        _raise_first(err, data_class, ("data",), origins, source)


def validate_recipe(data: dict[str, Any], source: str = "<python>", origins: dict | None = None) -> Recipe:
    """Validate a recipe mapping into a `Recipe` whose stages carry their typed configs."""
    origins = origins or {}
    load_builtin_stages()
    refuse_non_finite(data, (), origins, source)
    if isinstance(data, dict) and data.get("task") in TASKS and isinstance(data.get("data"), dict):
        data = {**data, "data": _validate_data(data["data"], data["task"], origins, source)}
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        _raise_first(err, Recipe, (), origins, source)
    recipe.training = validate_training_arguments(recipe.training, ("training",), origins, source)
    trains = False  # whether a stage trains with `training:` (its scheduler is checked there)

    used_names: set[str] = set()
    stages = []
    for index, entry in enumerate(recipe.stages):
        loc = ("stages", index)
        where = _origin(origins, loc, source)
        if isinstance(entry, str):  # `- finetune` is short for `- type: finetune`
            entry = {"type": entry}
        if not isinstance(entry, dict) or "type" not in entry:
            raise RecipeError(where, _key_path(loc), f"expected a mapping with a 'type' key, got {excerpt(entry)}")
        entry = dict(entry)
        kind = entry.pop("type")
        if kind not in STAGES:
            close = difflib.get_close_matches(str(kind), list(STAGES), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(where, _key_path(loc + ("type",)),
                              f"unknown stage {excerpt(kind)}{hint}; expected one of: {', '.join(STAGES)}")
        config_cls = STAGES[kind].config_cls
        try:
            config = config_cls.model_validate(entry)
        except ValidationError as err:
            _raise_first(err, config_cls, loc, origins, source)
        if getattr(config, "training", None) is not None:
            config.training = validate_training_arguments(config.training, loc + ("training",), origins, source)
            # The stage trains with the recipe's `training:` under its own: the scheduler may come from either.
            merged, owner = {**recipe.training, **config.training}, loc if "lr_scheduler_kwargs" in config.training \
                else ()
            check_scheduler_kwargs(merged, owner + ("training",), origins, source)
            trains = True
        name = config.name or kind
        if name in used_names:  # a second `evaluate` becomes `evaluate-2`, unless named
            name = next(f"{name}-{n}" for n in range(2, len(recipe.stages) + 2) if f"{name}-{n}" not in used_names)
        if "/" in name or "\\" in name or name.startswith("."):  # OUTPUT/stages/<name> must stay inside OUTPUT
            raise RecipeError(where, _key_path(loc + ("name",)),
                              f"stage names cannot contain '/' or '\\' or start with '.': {excerpt(name)}")
        # The name is a folder name, a log word and a --rerun-from argument: a NUL byte fails deep in the file
        # system; a newline or an escape sequence forges log lines.
        if not name.isprintable() or len(name) > MAX_STAGE_NAME:
            raise RecipeError(where, _key_path(loc + ("name",)), f"stage names are at most {MAX_STAGE_NAME} "
                              f"printable characters (no control characters): {excerpt(name)}")
        last = next((stage for stage in stages if STAGES[stage.type].writes_final_output), None)
        if last is not None:
            named = f"'{last.name}'" + (f" ({last.type})" if last.name != last.type else "")
            raise RecipeError(where, _key_path(loc), f"stage {named} must be the last stage: what runs after it "
                              f"would not be in its output; move this {kind} stage before it")
        try:
            config.check_after(stages)
        except ValueError as err:
            raise RecipeError(where, _key_path(loc), str(err)) from None
        used_names.add(name)
        stages.append(Stage(type=kind, name=name, config=config))
    if not trains:
        check_scheduler_kwargs(recipe.training, ("training",), origins, source)
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
