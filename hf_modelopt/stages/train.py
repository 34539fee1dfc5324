"""The `finetune` stage: plain supervised training of the current model with `transformers.Trainer`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import Field

from . import STAGES, ModelState, StageConfig, StageContext, ensure_loaded, register_stage

logger = logging.getLogger("hf_modelopt")

# Where a recipe is silent: no external loggers; a checkpoint every 200 steps (and at the end), only the latest
# kept, so that an interrupted stage resumes (`--resume`) with at most 200 steps lost. The pipeline deletes a
# stage's checkpoints once the stage has finished: its saved model is the stage's output.
TRAINING_DEFAULTS = {
    "report_to": "none",
    "logging_steps": 50,
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 1,
    "restore_callback_states_from_checkpoint": True,  # schedules kept in stateful callbacks resume where they were
}

# The help of every training stage's `training:` key.
TRAINING_HELP = "TrainingArguments for this stage only, over the recipe's `training:`."


def training_arguments(settings, stage_training: dict[str, Any], output_dir: Path):
    """`TrainingArguments` from the defaults, the recipe's `training:` and the stage's own overrides.

    `settings`: the run's `RunSettings` (or a `Recipe`: anything with `.task` and `.training`)."""
    import torch
    from transformers import TrainingArguments

    from ..distributed import use_cpu
    from ..tasks import get_task

    defaults = {**TRAINING_DEFAULTS, "dataloader_pin_memory": torch.cuda.is_available()}
    if not get_task(settings.task).token_level_loss:
        # A classifier's loss is a mean over its own process's batch. Left on, Trainer multiplies it (and the
        # gradients) by the number of processes, as if the model had divided a sum by the global token count
        # (which a causal LM's loss does, given num_items_in_batch).
        defaults["average_tokens_across_devices"] = False
    if use_cpu():
        defaults["use_cpu"] = True  # accelerate joins CPU processes into one DDP group only when told so
    return TrainingArguments(output_dir=str(output_dir), **{**defaults, **settings.training, **stage_training})


def training_data(settings, tokenizer):
    """Training rows of the train (and, if configured, eval) split plus the collator, as the run's task makes them
    (`hf_modelopt.tasks.training_rows`, what the technique functions use too)."""
    from ..data import has_split, load_split
    from ..tasks import training_rows

    evaluation = load_split(settings.data, "eval") if has_split(settings.data, "eval") else None
    return training_rows(settings.task, tokenizer, load_split(settings.data, "train"), evaluation, settings.data)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete Trainer checkpoint in `folder` (`checkpoint-STEP`), or None.

    Trainer writes `trainer_state.json` after the weights, optimizer and RNG states, so a checkpoint
    without it was cut short (the process was killed while saving) and is skipped.
    """
    complete = [path for path in Path(folder).glob("checkpoint-*")
                if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()]
    return max(complete, key=lambda path: int(path.name.split("-")[-1]), default=None)


def train_and_record(trainer, context: StageContext):
    """Run `trainer.train()` for a stage: keep its log history in the stage folder and say how it went.

    Resumes from `context.resume_from_checkpoint` when set. A stop signal (see `hf_modelopt.interrupt`)
    ends training after the current step with a checkpoint, then raises `RunInterrupted`.
    """
    from ..distributed import report_training_mode, whole_model
    from ..interrupt import RunInterrupted, StopOnSignalCallback, stop_requested, training_in_progress

    trainer.add_callback(StopOnSignalCallback())
    report_training_mode(trainer.accelerator, context.stage_name)
    resume = context.resume_from_checkpoint
    if resume is not None:
        logger.info("%s: resuming from %s", context.stage_name, resume)
    with training_in_progress():
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    signum = stop_requested()
    if signum is not None:
        saved = last_checkpoint(Path(trainer.args.output_dir))
        raise RunInterrupted(signum, context.stage_name, str(saved) if saved else None, trainer.state.global_step)
    checkpoints = Path(trainer.args.output_dir)
    # No checkpoint was saved: no empty folder (removed by one process: the folder is shared by all).
    if trainer.is_world_process_zero() and checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    (context.stage_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    trainer.model = whole_model(trainer.model)  # every process, together: weights sharded by FSDP2 / ZeRO-3
    logger.info("%s: trained %d steps in %.0f s (train loss %.4f)", context.stage_name,
                result.global_step, result.metrics["train_runtime"], result.training_loss)
    return result


def refuse_training_after(stage_type: str, earlier) -> None:
    """`StageConfig.check_after` of stages that update every weight of the model they get: refuse to follow a stage
    registered with `untrainable_output` (bitsandbytes 8- and 4-bit weights are frozen integer tensors)."""
    for stage in earlier:
        reason = STAGES[stage.type].untrainable_output
        if reason:
            raise ValueError(f"a {stage_type} stage trains every weight, but stage '{stage.name}' before it {reason}; "
                             f"put the {stage_type} stage before '{stage.name}'")


class FinetuneConfig(StageConfig):
    """Train the current model on the recipe's training data with a plain task loss."""

    requires_data = ("train",)
    training: dict[str, Any] = Field(default_factory=dict, description=TRAINING_HELP)

    def check_after(self, earlier) -> None:
        refuse_training_after("finetune", earlier)


def train_with_task_loss(model, tokenizer, stage_training: dict[str, Any], context: StageContext, callbacks=()):
    """Train `model` on the recipe's training data with a plain `Trainer` (the task's own loss).

    Shared by the stages that train without a teacher (`finetune`, `prune`, ...); returns the trainer.
    """
    from transformers import Trainer

    args = training_arguments(context.settings, stage_training, context.checkpoint_dir)
    train, evaluation, collator = training_data(context.settings, tokenizer)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation if args.eval_strategy != "no" else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    train_and_record(trainer, context)
    return trainer


@register_stage("finetune", FinetuneConfig)
def finetune_stage(state: ModelState, config: FinetuneConfig, context: StageContext) -> ModelState:
    ensure_loaded(state, context.settings)
    trainer = train_with_task_loss(state.model, state.tokenizer, config.training, context)
    return ModelState(model=trainer.model, tokenizer=state.tokenizer)
