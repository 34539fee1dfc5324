"""The one registry of recipe stages: stage name -> (config class, function); and the built-in stages.

A stage is a function `run(state, config, context) -> state`. It gets the model produced by the stages
before it, may write files into `context.stage_dir`, and returns the model the next stage receives (with
the metrics it measured, if any). The built-in stages (`train.py`, `distill.py`, `prune.py`, `quantize.py`,
`evaluate.py`, `export.py` here) are thin layers over the techniques' Python API; each stage config is the
technique's config plus the stage's own fields, so YAML and Python share one set of defaults.

What a stage needs from the runner is declared on its registration (`register_stage`'s flags: produces
metrics, untrainable output, writes the final output, card tags, report files), never inferred from its name, so a
third-party stage gets the behaviour of the built-in stage it imitates. A stage reads the run's settings
(`RunSettings`: model, task, data, training, ...), not the recipe: this package never imports `hf_modelopt.recipe`.

Third-party stages: a package declares an entry point in the group `hf_modelopt.stages` naming a module (or
a callable) whose import registers its stages with `@register_stage`; it is loaded with the built-in ones,
whenever a recipe is validated, so `hf-modelopt run` runs them (`hf-modelopt stages` lists them all).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

# A markdown section a stage may write into its folder; the export's model card shows it under the stage's name.
from ..export.record import STAGE_CARD_SECTION  # noqa: F401  (re-exported: stages write it)

if TYPE_CHECKING:
    from ..data import DataConfig
    from ..modeling import ModelConfig

logger = logging.getLogger("hf_modelopt")

# Modules whose import registers the built-in stages.
BUILTIN_STAGE_MODULES = (
    "hf_modelopt.stages.train",
    "hf_modelopt.stages.evaluate",
    "hf_modelopt.stages.distill",
    "hf_modelopt.stages.prune",
    "hf_modelopt.stages.minitron",
    "hf_modelopt.stages.quantize",
    "hf_modelopt.stages.export",
)
ENTRY_POINT_GROUP = "hf_modelopt.stages"
MODEL_SUBDIR = "model"  # a stage's saved model: OUTPUT/stages/<name>/model/


class StageConfig(BaseModel):
    """Fields every stage accepts. Subclasses add their own; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str | None = Field(None, description="Name of the stage's output folder; defaults to the stage type.")
    # Data splits ("train", "eval") the stage reads; checked before any stage runs.
    requires_data: ClassVar[tuple[str, ...]] = ()

    def check_after(self, earlier: list[Stage]) -> None:
        """Refuse a contradictory order: raise `ValueError` naming the earlier stage that rules this one out.

        `earlier` are the recipe's stages before this one (validated, with `type`, `name` and `config`).
        Runs while the recipe is validated; the default accepts any order.
        """

    def required_packages(self) -> dict[str, tuple[str, ...]]:
        """Optional packages (import names, see `hf_modelopt.extras`) this stage imports, by the config key that asks
        for them ("" for the stage itself); the runner refuses a missing one before any stage starts."""
        return {}

    def preflight(self, settings: RunSettings) -> None:
        """Checks that need more than the config (models, tokenizers), run before any stage starts.

        `settings` are the run's (`RunSettings`; its `resolved_stages` include this config). Raise a `UserError`
        naming the problem; the default checks nothing.
        """


class Stage(BaseModel):
    """One validated entry of a recipe's `stages:`: its registered type, unique name and typed config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    type: str
    name: str
    config: StageConfig


@dataclass(frozen=True)
class RunSettings:
    """What a stage reads of the run besides its own config: the recipe's settings, never the recipe itself.

    The attribute names are `Recipe`'s, so helpers that take "anything with .model / .task / .data / .training"
    accept either. Built by the recipe layer (`Recipe.run_settings()`).
    """

    model: ModelConfig
    task: str  # a registered task name (`hf_modelopt.tasks.TASKS`)
    data: DataConfig
    training: dict[str, Any]  # the recipe's `training:` (TrainingArguments keywords)
    source: str = "<python>"  # the recipe file, for `RecipeError`
    description: str = ""  # the recipe's description (the model card's)
    resolved_stages: tuple[Stage, ...] = ()  # every stage of the run, validated, in order
    # The resolved recipe (extends and --set applied) as reloadable YAML: the export writes it beside the model.
    recipe_yaml: str = ""


@dataclass
class ModelState:
    """What flows from stage to stage: a model in memory, or the folder it was saved to, or both."""

    model: Any = None
    tokenizer: Any = None
    path: Path | None = None  # a folder `from_pretrained` loads, once the model is saved
    description: str = ""  # the chain of stages that produced this model, for metrics and cards
    metrics: dict[str, float] | None = None  # set by stages that measure the model


@dataclass
class StageContext:
    """Everything a stage may read besides its own config."""

    settings: RunSettings
    stage_name: str
    stage_dir: Path
    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # records of the stages run so far
    # A Trainer checkpoint of this stage's interrupted attempt to continue from (`run --resume`).
    resume_from_checkpoint: Path | None = None
    # The main process's folder for this stage (`stage_dir` itself there); other processes write into
    # scratch folders, and read what the main process wrote (a teacher-logit cache) from here.
    shared_stage_dir: Path | None = None

    def __post_init__(self):
        if self.shared_stage_dir is None:
            self.shared_stage_dir = self.stage_dir

    @property
    def checkpoint_dir(self) -> Path:
        """Trainer checkpoints of this stage, one folder for every process: Trainer writes the weights from the
        main process and each process's RNG state there, and reads them all back on resume."""
        return self.shared_stage_dir / "checkpoints"


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its config class, its function and the contract the runner and the export read."""

    config_cls: type[StageConfig]
    run: Callable[[ModelState, StageConfig, StageContext], ModelState]
    changes_model: bool  # False for stages that only measure (their model passes through unchanged)
    cacheable: bool  # False for stages whose work is writing outside their folder (export)
    origin: str = ""  # the module that registered it (a third-party package's, for entry-point stages)
    # Its `state.metrics` are quality figures of the model: listed in the run summary (`RunResult["metrics"]`,
    # metrics.json) and the model card's evaluation table (other stages' metrics stay in their own records).
    produces_metrics: bool = False
    # Why the model it outputs cannot be trained as a whole, completing "stage 'x' before it ..." ("" when it can):
    # a stage that trains every weight refuses to follow it (`stages.train.refuse_training_after`).
    untrainable_output: str = ""
    # It writes the run's final folder: it must be the last stage, runs in the main process only and is never
    # cached; the runner appends `DEFAULT_FINAL_STAGE` to a recipe that has no such stage.
    writes_final_output: bool = False
    card_tags: tuple[str, ...] = ()  # Hub tags the exported model card gets when this stage ran ("quantized")
    # Files the stage writes beside its saved model (`stage_dir/model/`) that the export carries into the final
    # folder and reads into the card (JSON ones) when the exported model is that stage's output.
    report_files: tuple[str, ...] = ()

    def record_fields(self) -> dict[str, Any]:
        """The contract values the export reads, as plain fields of the stage's history record (so the export
        never reads this registry)."""
        return {"changes_model": self.changes_model, "produces_metrics": self.produces_metrics,
                "card_tags": list(self.card_tags), "report_files": list(self.report_files)}


STAGES: dict[str, StageSpec] = {}
# Appended by the runner to a recipe without a stage that `writes_final_output`: the final model is always written.
DEFAULT_FINAL_STAGE = "export"


def register_stage(name: str, config_cls: type[StageConfig], changes_model: bool = True,
                   cacheable: bool | None = None, *, produces_metrics: bool = False, untrainable_output: str = "",
                   writes_final_output: bool = False, card_tags: tuple[str, ...] = (),
                   report_files: tuple[str, ...] = ()):
    """Register `fn(state, config, context) -> state` as the recipe stage `name`.

    The flags are the stage's contract with the runner (see `StageSpec`): `changes_model` (False: it only
    measures), `cacheable` (default: unless it writes the final output), `produces_metrics`, `untrainable_output`
    (the reason, or ""), `writes_final_output`, `card_tags`, `report_files`.
    """
    if cacheable is None:
        cacheable = not writes_final_output
    if cacheable and writes_final_output:
        raise ValueError(f"stage {name!r}: a stage that writes the final output is never cached (it writes outside "
                         "its stage folder); leave cacheable unset")
    for value, what in ((card_tags, "card_tags"), (report_files, "report_files")):
        if isinstance(value, str) or not all(isinstance(item, str) and item for item in value):
            raise TypeError(f"stage {name!r}: {what} must be a tuple of non-empty strings, got {value!r}")
    card_tags, report_files = tuple(card_tags), tuple(report_files)

    def decorator(fn):
        if name in STAGES and STAGES[name].run is not fn:
            raise ValueError(f"stage {name!r} is already registered by {STAGES[name].run.__module__}")
        if not (isinstance(config_cls, type) and issubclass(config_cls, StageConfig)):
            raise TypeError(f"stage {name!r}: config_cls must subclass hf_modelopt.stages.StageConfig, "
                            f"got {config_cls!r}")
        STAGES[name] = StageSpec(config_cls, fn, changes_model, cacheable, fn.__module__,
                                 produces_metrics=produces_metrics, untrainable_output=untrainable_output,
                                 writes_final_output=writes_final_output, card_tags=card_tags,
                                 report_files=report_files)
        return fn

    return decorator


_entry_points_loaded = False


def load_builtin_stages() -> None:
    """Register the built-in stages and those of installed packages (entry point group `hf_modelopt.stages`)."""
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
    load_entry_point_stages()


def load_entry_point_stages() -> None:
    """Import every `hf_modelopt.stages` entry point once; a broken one is named in a `UserError`."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    from importlib.metadata import entry_points

    from ..errors import UserError

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as err:
            raise UserError(f"entry point {entry_point.name!r} = {entry_point.value!r} (group {ENTRY_POINT_GROUP}) "
                            f"failed to load: {type(err).__name__}: {err}") from err
        if callable(loaded) and not isinstance(loaded, type):
            loaded()  # a registration function rather than a module whose import registers
    _entry_points_loaded = True


def save_model_state(state: ModelState, folder: Path) -> None:
    """Save model and tokenizer so `from_pretrained(folder)` loads them: with the writer of the format the model is
    in (`formats.write_model`; a bitsandbytes one as it was before a CPU forward pass repacked it)."""
    from ..formats.detect import write_model

    write_model(state.model, folder, state.tokenizer)
    state.path = folder


def ensure_loaded(state, settings):
    """Give `state` a model and tokenizer in memory, loading them from `state.path` if needed.

    `settings`: the run's `RunSettings` (or anything with `.model`, `.task`, `.data`, `.training`: a `Recipe`)."""
    from ..modeling import load_model, load_tokenizer

    if state.model is None and state.path is not None:
        state.model = load_model(settings.model, settings.task, path=str(state.path))
    elif state.model is None:
        from transformers import set_seed

        # Seed before building the model, so newly initialised weights (a task head) are reproducible.
        set_seed(settings.training.get("seed", 42))
        from ..tasks import get_task

        labels, count_labels = None, get_task(settings.task).count_labels
        if count_labels is not None:
            from ..data import has_split, load_split

            split = "train" if has_split(settings.data, "train") else "eval"
            labels = count_labels(load_split(settings.data, split), settings.data)
        state.model = load_model(settings.model, settings.task, num_labels=labels)
    if state.tokenizer is None:
        state.tokenizer = load_tokenizer(settings.model, path=str(state.path) if state.path else None,
                                         task=settings.task)
    return state


def meta_model(spec, task: str):
    """The recipe's model built from its config on the meta device: every shape, no weights (nothing is read but
    the config)."""
    import torch
    from transformers import AutoConfig

    from ..modeling import auto_model_class

    kwargs = {"trust_remote_code": spec.trust_remote_code, "revision": spec.revision}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    config = AutoConfig.from_pretrained(spec.name_or_path, **kwargs)
    with torch.device("meta"):
        return auto_model_class(task).from_config(config, trust_remote_code=spec.trust_remote_code)


def gets_recipe_model(recipe, config: StageConfig) -> bool:
    """Whether the stage of `config` gets the recipe's own model (no stage before it changes the model), so that its
    preflight may check that model (`meta_model`). A config outside the recipe's stages counts as first."""
    stages = recipe.resolved_stages
    position = next((i for i, stage in enumerate(stages) if stage.config is config), 0)
    return not any(STAGES[stage.type].changes_model for stage in stages[:position])
