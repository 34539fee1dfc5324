"""The `finetune` stage: plain supervised training of the current model with `transformers.Trainer`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from .stages import ModelState, StageConfig, StageContext, register_stage

logger = logging.getLogger("hf_modelopt")

# Where a recipe is silent: no external loggers, no mid-run checkpoints (stage outputs are the checkpoints).
TRAINING_DEFAULTS = {"report_to": "none", "save_strategy": "no", "logging_steps": 50}


def training_arguments(recipe, stage_training: dict[str, Any], output_dir: Path):
    """`TrainingArguments` from the defaults, the recipe's `training:` and the stage's own overrides."""
    import torch
    from transformers import TrainingArguments

    from .distributed import use_cpu

    defaults = {**TRAINING_DEFAULTS, "dataloader_pin_memory": torch.cuda.is_available()}
    if use_cpu():
        defaults["use_cpu"] = True  # accelerate joins CPU processes into one DDP group only when told so
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **recipe.training, **stage_training})


def training_data(recipe, tokenizer, raw_train=None):
    """Tokenized train (and, if configured, eval) datasets plus the collator for the recipe's task.

    `raw_train` replaces the recipe's training split (a stage that adds examples passes it).
    """
    from transformers import DataCollatorWithPadding, default_data_collator

    from .data import has_split, load_split, tokenize_causal_lm, tokenize_classification

    tokenize = tokenize_classification if recipe.task == "text-classification" else tokenize_causal_lm
    collator = DataCollatorWithPadding(tokenizer) if recipe.task == "text-classification" else default_data_collator
    train = tokenize(raw_train if raw_train is not None else load_split(recipe.data, "train"), tokenizer, recipe.data)
    evaluation = None
    if has_split(recipe.data, "eval"):
        evaluation = tokenize(load_split(recipe.data, "eval"), tokenizer, recipe.data)
    return train, evaluation, collator


def train_and_record(trainer, context: StageContext):
    """Run `trainer.train()` for a stage: keep its log history in the stage folder and say how it went."""
    result = trainer.train()
    checkpoints = Path(trainer.args.output_dir)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):  # no checkpoint was saved: no empty folder
        checkpoints.rmdir()
    (context.stage_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    logger.info("%s: trained %d steps in %.0f s (train loss %.4f)", context.stage_name,
                result.global_step, result.metrics["train_runtime"], result.training_loss)
    return result


class FinetuneConfig(StageConfig):
    """Train the current model on the recipe's training data with a plain task loss."""

    requires_data = ("train",)
    training: dict[str, Any] = Field(
        default_factory=dict, description="TrainingArguments for this stage only, over the recipe's `training:`."
    )


@register_stage("finetune", FinetuneConfig)
def finetune_stage(state: ModelState, config: FinetuneConfig, context: StageContext) -> ModelState:
    from transformers import Trainer

    from .modeling import ensure_loaded

    recipe = context.recipe
    ensure_loaded(state, recipe)
    args = training_arguments(recipe, config.training, context.stage_dir / "checkpoints")
    train, evaluation, collator = training_data(recipe, state.tokenizer)
    trainer = Trainer(
        model=state.model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation if args.eval_strategy != "no" else None,
        data_collator=collator,
        processing_class=state.tokenizer,
    )
    train_and_record(trainer, context)
    return ModelState(model=trainer.model, tokenizer=state.tokenizer)
