"""The pruning recipe stages: `prune` (gradual unstructured, while training), `prune_structured` (heads and
neurons removed, then recovery training) and `prune_oneshot` (Wanda / SparseGPT for causal LMs)."""

from __future__ import annotations

import copy
import json
import logging

from ..stages import ModelState, StageContext, register_stage
from .config import OneShotPruneStageConfig, PruneStageConfig, StructuredPruneStageConfig

logger = logging.getLogger("hf_modelopt")


def kd_teacher(model, config, context: StageContext):
    """The KD teacher: the model of the earlier stage `config.teacher`, else a frozen copy of the incoming one."""
    if config.teacher is None:
        return copy.deepcopy(model)  # the model itself is pruned and trained
    from ..modeling import load_model

    # The shared stage folders: every process reads the folder the main process wrote.
    from ..pipeline import MODEL_SUBDIR

    folder = context.shared_stage_dir.parent / config.teacher / MODEL_SUBDIR
    logger.info("%s: KD teacher is the model of stage '%s' (%s)", context.stage_name, config.teacher, folder)
    return load_model(context.recipe.model, context.recipe.task, path=str(folder))


@register_stage("prune", PruneStageConfig)
def prune_stage(state: ModelState, config: PruneStageConfig, context: StageContext) -> ModelState:
    from ..modeling import ensure_loaded
    from ..train import train_with_task_loss
    from .callback import PruningCallback

    ensure_loaded(state, context.recipe)
    model, tokenizer = state.model, state.tokenizer
    callback = PruningCallback(config)
    if config.distillation is not None:
        from ..distill.stage import train_with_distillation

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
    from ..export.sparse import save_sparse, weights_size_on_disk
    from ..pipeline import MODEL_SUBDIR, save_model_state
    from .masks import prunable_linears, sparsity_of, weight_numel

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


@register_stage("prune_structured", StructuredPruneStageConfig)
def prune_structured_stage(state: ModelState, config: StructuredPruneStageConfig,
                           context: StageContext) -> ModelState:
    from torch.utils.data import DataLoader

    from ..modeling import ensure_loaded
    from ..train import train_with_task_loss, training_data
    from .structured import (
        choose_kept,
        gradient_importance,
        head_geometry,
        magnitude_importance,
        parameter_count,
        remove_heads_and_neurons_,
    )

    recipe = context.recipe
    ensure_loaded(state, recipe)
    model, tokenizer = state.model, state.tokenizer
    teacher = kd_teacher(model, config, context) if config.distillation is not None else None
    if config.importance == "gradient":
        train, _, collator = training_data(recipe, tokenizer)
        batch_size = {**recipe.training, **config.training}.get("per_device_train_batch_size", 8)
        count = min(len(train), config.calibration_batches * batch_size)
        loader = DataLoader(train.select(range(count)), batch_size=batch_size, collate_fn=collator)
        head_scores, neuron_scores = gradient_importance(model, loader)
    else:
        head_scores, neuron_scores = magnitude_importance(model)
    _, kv_heads, _ = head_geometry(model.config)
    keep_heads, keep_neurons = choose_kept(head_scores, neuron_scores, config.heads, config.neurons, kv_heads)
    before = parameter_count(model)
    remove_heads_and_neurons_(model, keep_heads if config.heads else None, keep_neurons if config.neurons else None)
    after = parameter_count(model)
    logger.info("prune_structured: %d of %d heads and %d of %d FFN neurons kept per layer; %.1f M -> %.1f M "
                "parameters", len(keep_heads[0]), head_scores[0].numel(), len(keep_neurons[0]),
                neuron_scores[0].numel(), before / 1e6, after / 1e6)
    (context.stage_dir / "structure.json").write_text(json.dumps(
        {"kept_heads": keep_heads, "kept_neurons": keep_neurons, "parameters_before": before,
         "parameters_after": after, "importance": config.importance}, indent=2))
    if config.recover:
        if teacher is not None:
            from ..distill.stage import train_with_distillation

            trainer = train_with_distillation(teacher, model, tokenizer, config.distillation, config.training,
                                              context, copied_from=list(range(model.config.num_hidden_layers)))
        else:
            trainer = train_with_task_loss(model, tokenizer, config.training, context)
        model = trainer.model
    state = ModelState(model=model, tokenizer=tokenizer)
    state.metrics = {"parameters": after, "parameters_before": before}
    return state


@register_stage("prune_oneshot", OneShotPruneStageConfig)
def prune_oneshot_stage(state: ModelState, config: OneShotPruneStageConfig, context: StageContext) -> ModelState:
    from ..data import load_split, tokenize_causal_lm
    from ..modeling import ensure_loaded
    from .oneshot import calibration_batches, prune_oneshot_

    recipe = context.recipe
    ensure_loaded(state, recipe)
    blocks = tokenize_causal_lm(load_split(recipe.data, "train"), state.tokenizer, recipe.data)
    logger.info("prune_oneshot: %s, %s, sparsity %.2f, %d calibration sequences of %d tokens", config.method,
                config.pattern, config.sparsity, min(config.calibration_samples, len(blocks)), recipe.data.max_length)
    prune_oneshot_(state.model, calibration_batches(blocks, config.calibration_samples), config.method,
                   config.sparsity, config.pattern, config.targets, config.exclude, config.block_size,
                   config.dampening)
    return _finish_unstructured(ModelState(model=state.model, tokenizer=state.tokenizer), config, context)
