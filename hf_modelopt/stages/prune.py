"""The pruning recipe stages, thin layers over `hf_modelopt.prune`: `prune` (gradual unstructured, with
`PruningCallback` while training), `prune_structured` (`prune_` with heads and neurons, then recovery training),
`prune_oneshot` (`prune_` with Wanda / SparseGPT from calibration rows of the recipe's task) and `prune_experts`
(`prune_` removing whole experts of mixture-of-experts blocks, scored on calibration rows)."""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import Field

from ..compat import task_refusal
from ..distill.config import KnowledgeDistillationConfig
from ..errors import RecipeError
from ..prune.config import ExpertRemovalConfig, OneShotPruningConfig, PruningConfig, StructuredPruningConfig
from ..tasks import get_task
from . import (
    MODEL_SUBDIR,
    ModelState,
    StageConfig,
    StageContext,
    ensure_loaded,
    gets_recipe_model,
    meta_model,
    register_stage,
    save_model_state,
)
from .kd import TEACHER_HELP, check_kd_settings, check_teacher_stage, kd_teacher, train_with_distillation
from .train import TRAINING_HELP, refuse_training_after

logger = logging.getLogger("hf_modelopt")


class PruneStageConfig(StageConfig, PruningConfig):
    """The `prune` stage: train the incoming model while `PruningCallback` raises its sparsity.

    With `distillation:` the loss is KD from the incoming model (a frozen copy is the teacher).
    """

    distillation: KnowledgeDistillationConfig | None = Field(
        None, description="Train with knowledge distillation from the incoming model (a frozen copy) instead of "
        "the task loss; the same settings as the `distill` stage's loss.",
    )
    teacher: str | None = Field(None, description=TEACHER_HELP)
    sparse_checkpoint: bool = Field(True, description="Also write the model in the compressed sparse format "
                                    "(stage folder `sparse/`) and report both sizes on disk.")
    training: dict[str, Any] = Field(default_factory=dict, description=TRAINING_HELP)
    requires_data = ("train",)

    def check_after(self, earlier) -> None:
        refuse_training_after("prune", earlier)
        check_teacher_stage(self, earlier)

    def preflight(self, recipe) -> None:
        if self.distillation is not None:
            check_kd_settings(self.distillation, recipe, self.training, "prune.distillation")


class StructuredPruneStageConfig(StageConfig, StructuredPruningConfig):
    """The `prune_structured` stage: remove attention heads and FFN neurons (`prune_`), then recover by training."""

    recover: bool = Field(True, description="Train after the removal (with `distillation:`, by KD).")
    distillation: KnowledgeDistillationConfig | None = Field(
        None, description="Recover with knowledge distillation from the unpruned incoming model.",
    )
    teacher: str | None = Field(None, description=TEACHER_HELP)
    training: dict[str, Any] = Field(default_factory=dict, description=TRAINING_HELP)
    requires_data = ("train",)

    def check_after(self, earlier) -> None:
        if self.recover:
            refuse_training_after("prune_structured", earlier)
        check_teacher_stage(self, earlier)

    def preflight(self, recipe) -> None:
        if self.distillation is not None:
            check_kd_settings(self.distillation, recipe, self.training, "prune_structured.distillation")


class OneShotPruneStageConfig(StageConfig, OneShotPruningConfig):
    """The `prune_oneshot` stage: prune once from calibration data (`prune_`), no training."""

    sparse_checkpoint: bool = Field(True, description="Also write the compressed sparse format (`sparse/`).")
    requires_data = ("train",)

    def preflight(self, recipe) -> None:
        if refusal := task_refusal("one-shot pruning", recipe.task):  # (the model itself: `prune_` checks it)
            raise RecipeError(recipe.source, "prune_oneshot", f"{refusal}; use the prune stage, which trains while "
                              "pruning")


class ExpertRemovalStageConfig(StageConfig, ExpertRemovalConfig):
    """The `prune_experts` stage: remove whole experts of every mixture-of-experts block (`prune_`: routing frequency
    x output norm on calibration rows from the start of the training split); the config keeps the smaller expert
    count, so the result loads with plain `from_pretrained`. No training."""

    calibration_batch_size: int = Field(4, gt=0, description="Calibration rows per batch (the stage scores "
                                        "calibration_batches batches from the start of the training split).")
    requires_data = ("train",)

    def preflight(self, recipe) -> None:
        """When no earlier stage changes the model, the recipe's model (built on the meta device from its config: no
        weights are read) must have MoE blocks that can keep `experts` experts, so a bad count is refused before any
        stage runs."""
        if refusal := task_refusal("one-shot pruning", recipe.task):  # (calibrated on the task's rows, as one-shot)
            raise RecipeError(recipe.source, "prune_experts", refusal)
        if not gets_recipe_model(recipe, self):
            return  # the model this stage gets is known only when it runs: `prune_` checks it before it scores
        from ..prune.experts import check_expert_count

        try:
            check_expert_count(meta_model(recipe.model, recipe.task), self.experts)
        except ValueError as err:
            raise RecipeError(recipe.source, "prune_experts.experts", str(err)) from None


@register_stage("prune", PruneStageConfig, card_tags=("pruned",))
def prune_stage(state: ModelState, config: PruneStageConfig, context: StageContext) -> ModelState:
    from ..prune.callback import PruningCallback
    from .train import train_with_task_loss

    ensure_loaded(state, context.settings)
    model, tokenizer = state.model, state.tokenizer
    callback = PruningCallback(config)
    if config.distillation is not None:
        teacher = kd_teacher(model, config, context)
        trainer = train_with_distillation(teacher, model, tokenizer, config.distillation, config.training, context,
                                          copied_from=list(range(model.config.num_hidden_layers)),
                                          callbacks=[callback])
    else:
        trainer = train_with_task_loss(model, tokenizer, config.training, context, callbacks=[callback])
    return _finish_unstructured(ModelState(model=trainer.model, tokenizer=tokenizer), config, context)


def _finish_unstructured(state: ModelState, config, context: StageContext) -> ModelState:
    """Measure the sparsity, save the dense model and (if asked) the compressed sparse checkpoint."""
    from ..distributed import is_main_process
    from ..formats.detect import weights_size_on_disk
    from ..formats.hf_modelopt import save_sparse
    from ..prune.masks import prunable_linears, sparsity_of, weight_numel

    targeted = prunable_linears(state.model, config.targets, config.exclude)
    report = {"target_sparsity": config.sparsity, "sparsity": sparsity_of(targeted),
              "targeted_weights": sum(weight_numel(m) for m in targeted.values()),
              "per_layer": {name: sparsity_of({name: m}) for name, m in targeted.items()}}
    logger.info("%s: %.2f %% of %d targeted weights are zero (target %.1f %%)", context.stage_name,
                report["sparsity"] * 100, report["targeted_weights"], config.sparsity * 100)
    state.metrics = {"sparsity": round(report["sparsity"], 6)}
    if not is_main_process():  # the main process writes the model files (see hf_modelopt.distributed)
        return state
    save_model_state(state, context.stage_dir / MODEL_SUBDIR)
    if config.sparse_checkpoint:
        save_sparse(state.model, context.stage_dir / "sparse", state.tokenizer)
        dense = weights_size_on_disk(context.stage_dir / MODEL_SUBDIR)
        sparse = weights_size_on_disk(context.stage_dir / "sparse")
        report.update(dense_bytes=dense, sparse_bytes=sparse)
        state.metrics.update(dense_mb=round(dense / 1e6, 2), sparse_mb=round(sparse / 1e6, 2))
        logger.info("%s: weights on disk %.1f MB dense, %.1f MB in the sparse format (%.2fx); load either with "
                    "from_pretrained (the sparse one after `import hf_modelopt`)", context.stage_name, dense / 1e6,
                    sparse / 1e6, sparse / dense)
    (context.stage_dir / "sparsity.json").write_text(json.dumps(report, indent=2))
    return state


@register_stage("prune_structured", StructuredPruneStageConfig, card_tags=("pruned",))
def prune_structured_stage(state: ModelState, config: StructuredPruneStageConfig,
                           context: StageContext) -> ModelState:
    from torch.utils.data import DataLoader

    from ..prune.prune import prune_
    from .train import train_with_task_loss, training_data

    recipe = context.settings
    ensure_loaded(state, recipe)
    model, tokenizer = state.model, state.tokenizer
    teacher = kd_teacher(model, config, context) if config.distillation is not None else None
    batches = None
    if config.importance == "gradient":
        train, _, collator = training_data(recipe, tokenizer)
        batch_size = {**recipe.training, **config.training}.get("per_device_train_batch_size", 8)
        count = min(len(train), config.calibration_batches * batch_size)
        batches = DataLoader(train.select(range(count)), batch_size=batch_size, collate_fn=collator)
    report = prune_(model, config, batches)  # (a stage config is its technique's config, plus stage fields)
    (context.stage_dir / "structure.json").write_text(json.dumps(report, indent=2))
    if config.recover:
        if teacher is not None:
            trainer = train_with_distillation(teacher, model, tokenizer, config.distillation, config.training,
                                              context, copied_from=list(range(model.config.num_hidden_layers)))
        else:
            trainer = train_with_task_loss(model, tokenizer, config.training, context)
        model = trainer.model
    state = ModelState(model=model, tokenizer=tokenizer)
    state.metrics = {"parameters": report["parameters_after"], "parameters_before": report["parameters_before"]}
    return state


@register_stage("prune_oneshot", OneShotPruneStageConfig, card_tags=("pruned",))
def prune_oneshot_stage(state: ModelState, config: OneShotPruneStageConfig, context: StageContext) -> ModelState:
    from ..data import load_split
    from ..prune.prune import prune_

    recipe = context.settings
    ensure_loaded(state, recipe)
    batches = list(get_task(recipe.task).calibration_batches(load_split(recipe.data, "train"), state.tokenizer,
                                                             recipe.data, config.calibration_samples))
    logger.info("prune_oneshot: %s, %s, sparsity %.2f, %d calibration examples of up to %d tokens", config.method,
                config.pattern, config.sparsity, sum(len(next(iter(b.values()))) for b in batches),
                recipe.data.max_length)
    prune_(state.model, config, batches)
    return _finish_unstructured(ModelState(model=state.model, tokenizer=state.tokenizer), config, context)


@register_stage("prune_experts", ExpertRemovalStageConfig, card_tags=("pruned",))
def prune_experts_stage(state: ModelState, config: ExpertRemovalStageConfig, context: StageContext) -> ModelState:
    from ..data import load_split
    from ..distributed import is_main_process
    from ..prune.prune import prune_

    recipe = context.settings
    ensure_loaded(state, recipe)
    rows = config.calibration_batches * config.calibration_batch_size
    batches = list(get_task(recipe.task).calibration_batches(load_split(recipe.data, "train"), state.tokenizer,
                                                             recipe.data, rows, config.calibration_batch_size))
    logger.info("prune_experts: keep %d experts per MoE block, scored on %d calibration rows of up to %d tokens",
                config.experts, rows, recipe.data.max_length)
    report = prune_(state.model, config, batches)
    if is_main_process():
        (context.stage_dir / "experts.json").write_text(json.dumps(report, indent=2))
    state.metrics = {"experts": config.experts, "parameters": report["parameters_after"],
                     "parameters_before": report["parameters_before"]}
    return state
