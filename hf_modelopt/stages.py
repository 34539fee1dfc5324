"""The one registry of recipe stages: stage name -> (config class, function).

A stage is a function `run(state, config, context) -> state`. It gets the model produced by the stages
before it, may write files into `context.stage_dir`, and returns the model the next stage receives (with
the metrics it measured, if any). Techniques register their stages here with `@register_stage`; the
recipe validates each `stages:` entry into the registered config class.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from .recipe import Recipe, Stage

logger = logging.getLogger("hf_modelopt")

# Modules whose import registers the built-in stages; techniques add themselves to this list.
BUILTIN_STAGE_MODULES = (
    "hf_modelopt.train",
    "hf_modelopt.metrics",
    "hf_modelopt.distill.stage",
    "hf_modelopt.prune.stage",
    "hf_modelopt.quant.stage",
    "hf_modelopt.export.save",
)


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

    def preflight(self, recipe: Recipe) -> None:
        """Checks that need more than the config (models, tokenizers), run before any stage starts.

        Raise a `UserError` naming the problem; the default checks nothing.
        """


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

    recipe: Recipe
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
    config_cls: type[StageConfig]
    run: Callable[[ModelState, StageConfig, StageContext], ModelState]
    changes_model: bool  # False for stages that only measure (their model passes through unchanged)
    cacheable: bool  # False for stages whose work is writing outside their folder (export)


STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, config_cls: type[StageConfig], changes_model: bool = True, cacheable: bool = True):
    """Register `fn(state, config, context) -> state` as the recipe stage `name`."""

    def decorator(fn):
        if name in STAGES and STAGES[name].run is not fn:
            raise ValueError(f"stage {name!r} is already registered by {STAGES[name].run.__module__}")
        STAGES[name] = StageSpec(config_cls, fn, changes_model, cacheable)
        return fn

    return decorator


def load_builtin_stages() -> None:
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
