"""`prune_(model, config, batches=None)`: prune a model in place, the technique chosen by the config's type.

One handler per config type, in a plain dict (torchao's `quantize_` does the same):

- `StructuredPruningConfig`: score attention heads and FFN neurons (gradient importance from `batches`, or
  weight magnitude), then rebuild every block's Linear layers with the kept ones.
- `OneShotPruningConfig`: Wanda / SparseGPT from calibration `batches` (magnitude needs none), block by block.
- `ExpertRemovalConfig`: whole experts of mixture-of-experts blocks removed, scored on calibration `batches`.
- `PruningConfig`: magnitude pruning to the final sparsity at once, as `PruningCallback` would at its last
  update (movement scores exist only while training: use the callback).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from ..compat import require_support
from ..inplace import changes_in_place
from .config import ExpertRemovalConfig, OneShotPruningConfig, PruningConfig, StructuredPruningConfig

logger = logging.getLogger("hf_modelopt")

PRUNE_HANDLERS: dict[type, Callable] = {}


def _handles(config_type: type):
    def decorator(fn):
        PRUNE_HANDLERS[config_type] = fn
        return fn

    return decorator


@changes_in_place
def prune_(model, config, batches: Iterable[dict] | None = None) -> dict:
    """Prune `model` in place as `config` says; returns a report (sparsity, or what was kept).

    Args:
        model: a transformers model (the structured and one-shot handlers know its block layout).
        config: a `StructuredPruningConfig`, `OneShotPruningConfig` or `PruningConfig`.
        batches: model inputs (dicts of tensors, with `labels` for gradient importance) for the methods that
            score from data: structured pruning with `importance="gradient"`, Wanda and SparseGPT.

    Example:
        report = prune_(model, StructuredPruningConfig(heads=0.5, neurons=0.5), batches=train_dataloader)
    """
    handler = next((fn for kind, fn in PRUNE_HANDLERS.items() if isinstance(config, kind)), None)
    if handler is None:
        raise TypeError(f"prune_ takes a {', '.join(k.__name__ for k in PRUNE_HANDLERS)}; got "
                        f"{type(config).__name__}")
    return handler(model, config, batches)


def _require_batches(batches, why: str):
    if batches is None:
        raise ValueError(f"{why} scores weights from data: pass batches= (model inputs, e.g. a DataLoader)")
    return batches


@_handles(StructuredPruningConfig)
def _structured(model, config: StructuredPruningConfig, batches) -> dict:
    require_support("structured pruning", model)
    from itertools import islice

    from .structured import (
        choose_kept,
        gradient_importance,
        magnitude_importance,
        parameter_count,
        prunable_blocks,
        remove_heads_and_neurons_,
        same_heads_layers,
    )

    if config.importance == "gradient":
        scoring = islice(_require_batches(batches, "importance='gradient'"), config.calibration_batches)
        head_scores, neuron_scores = gradient_importance(model, scoring)
    else:
        head_scores, neuron_scores = magnitude_importance(model)
    kv_heads = [block.kv_heads for block in prunable_blocks(model)]
    keep_heads, keep_neurons = choose_kept(head_scores, neuron_scores, config.heads, config.neurons, kv_heads,
                                           same_heads_layers(model))
    before = parameter_count(model)
    remove_heads_and_neurons_(model, keep_heads if config.heads else None, keep_neurons if config.neurons else None)
    after = parameter_count(model)
    logger.info("structured pruning: %d of %d heads and %d of %d FFN neurons kept per layer; %.1f M -> %.1f M "
                "parameters", len(keep_heads[0]), head_scores[0].numel(), len(keep_neurons[0]),
                neuron_scores[0].numel(), before / 1e6, after / 1e6)
    return {"kept_heads": keep_heads, "kept_neurons": keep_neurons, "parameters_before": before,
            "parameters_after": after, "importance": config.importance}


@_handles(OneShotPruningConfig)
def _one_shot(model, config: OneShotPruningConfig, batches) -> dict:
    from .masks import block_parameters_report, prunable_linears, sparsity_of
    from .oneshot import prune_oneshot_

    if config.method != "magnitude":
        batches = list(_require_batches(batches, f"method={config.method!r}"))
    per_layer = prune_oneshot_(model, batches, config.method, config.sparsity, config.pattern, config.targets,
                               config.exclude, config.block_size, config.dampening)
    modules = prunable_linears(model, config.targets, config.exclude)
    return {"sparsity": sparsity_of(modules), "per_layer": per_layer, **block_parameters_report(model, modules)}


@_handles(PruningConfig)
def _at_once(model, config: PruningConfig, batches) -> dict:
    import torch

    require_support("gradual pruning", model)  # the same pruning as PruningCallback's last update
    from .masks import (
        apply_masks_,
        block_parameters_report,
        full_weight,
        masks_from_scores,
        prunable_linears,
        sparsity_of,
    )

    if config.method == "movement":
        raise ValueError("movement pruning scores weights by how they move while training: use "
                         "PruningCallback(config) with a Trainer, or method='magnitude' here")
    modules = prunable_linears(model, config.targets, config.exclude)
    with torch.no_grad():
        scores = {name: full_weight(module).abs().float() for name, module in modules.items()}
    apply_masks_(modules, masks_from_scores(scores, config.sparsity, config.scope))
    return {"sparsity": sparsity_of(modules), "target_sparsity": config.sparsity,
            **block_parameters_report(model, modules)}


@_handles(ExpertRemovalConfig)
def _remove_experts(model, config: ExpertRemovalConfig, batches) -> dict:
    from itertools import islice

    from .experts import remove_experts_by_importance_

    scoring = list(islice(_require_batches(batches, "expert removal"), config.calibration_batches))
    return remove_experts_by_importance_(model, scoring, config.experts)
