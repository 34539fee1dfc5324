"""What the stages that train by knowledge distillation share (not a stage itself): the recipe's KD keys checked by
the technique's rules, the teacher of the pruning stages, and the call to `hf_modelopt.distill.distill` with the
recipe's data and training settings.

The `distill` stage and the stages with `distillation:` (`prune`, `prune_structured`, `minitron`) import it; the KD
work itself is `distill()`'s, the same for a script.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from ..distill.config import KnowledgeDistillationConfig
from ..errors import RecipeError
from . import MODEL_SUBDIR, STAGES, StageContext

logger = logging.getLogger("hf_modelopt")

TEACHER_HELP = ("With `distillation:`, the name of an earlier stage whose model is the teacher (e.g. `finetune`, "
                "when a distilled student is pruned); default: the incoming model, unpruned.")


def check_kd_settings(kd: KnowledgeDistillationConfig, recipe, stage_training: dict[str, Any], key: str) -> None:
    """`hf_modelopt.distill.check_distillation` on the recipe's task, data and training (the stage's
    `training:` over the recipe's), its refusal reported under the recipe key `key` (`prune.distillation`)."""
    from ..distill.distill import DistillationSettingError, check_distillation

    evaluates = {**recipe.training, **stage_training}.get("eval_strategy", "no") not in ("no", None)
    try:
        check_distillation(kd, recipe.task, recipe.data, evaluates=evaluates)
    except DistillationSettingError as err:
        raise RecipeError(recipe.source, f"{key}.{err.key}", err.reason) from None


def check_teacher_stage(config, earlier) -> None:
    """`teacher` must name an earlier stage that produced a model, and needs `distillation:`."""
    if config.teacher is None:
        return
    if config.distillation is None:
        raise ValueError("teacher is the KD teacher: set distillation: as well")
    producers = [stage.name for stage in earlier if STAGES[stage.type].changes_model]
    if config.teacher not in producers:
        raise ValueError(f"teacher: no earlier stage named '{config.teacher}' produced a model (earlier model "
                         f"stages: {', '.join(producers) or 'none'})")


def kd_teacher(model, config, context: StageContext):
    """The KD teacher: the model of the earlier stage `config.teacher`, else a frozen copy of the incoming one."""
    if config.teacher is None:
        return copy.deepcopy(model)  # the model itself is pruned and trained
    from ..modeling import load_model

    # The shared stage folders: every process reads the folder the main process wrote.
    folder = context.shared_stage_dir.parent / config.teacher / MODEL_SUBDIR
    logger.info("%s: KD teacher is the model of stage '%s' (%s)", context.stage_name, config.teacher, folder)
    return load_model(context.settings.model, context.settings.task, path=str(folder))


def train_with_distillation(teacher, student, tokenizer, config: KnowledgeDistillationConfig,
                            stage_training: dict, context: StageContext, copied_from=None, callbacks=()):
    """`distill()` on the recipe's training split (and its evaluation split, when the training evaluates) with the
    recipe's training settings; checkpoints, the logit cache and offloaded teacher layers in the stage's folders,
    training through `train_and_record` (resume, log history, a sharded student gathered). Returns the trainer."""
    from ..data import has_split, load_split
    from ..distill.distill import distill
    from .train import train_and_record, training_arguments

    recipe = context.settings
    args = training_arguments(recipe, {**stage_training, "remove_unused_columns": False}, context.checkpoint_dir)
    evaluation = None
    if args.eval_strategy != "no" and has_split(recipe.data, "eval"):
        evaluation = load_split(recipe.data, "eval")
    return distill(teacher, student, tokenizer, load_split(recipe.data, "train"), config, args, task=recipe.task,
                   data=recipe.data, eval_data=evaluation, copied_from=copied_from, work_dir=context.stage_dir,
                   shared_dir=context.shared_stage_dir, callbacks=callbacks,
                   run_training=lambda trainer: train_and_record(trainer, context))
