"""Minitron-style structured pruning of decoder LLMs (Muralidharan et al. 2024, https://arxiv.org/abs/2407.14679;
Sreenivas et al. 2024, https://arxiv.org/abs/2408.11796): blocks, attention heads, FFN neurons and embedding
channels ranked by their activations on calibration batches (forward passes only), then removed to the same
shape in every block, so the pruned model is a plain config of its family.

    report = prune_(model, MinitronConfig(num_hidden_layers=24, hidden_size=768, intermediate_size=2048), batches)
    print(report["importance"].table())

`prune_` finds the handler below by the config's type (`prune.prune.PRUNE_HANDLERS`).
"""

from __future__ import annotations

import logging
from itertools import islice

from ...errors import UserError
from ...inplace import changes_in_place
from ..prune import _handles
from ..structured import parameter_count
from .config import MinitronConfig
from .importance import MinitronImportance, activation_importance, calibration_lm_loss, skipped_block
from .layout import DECODER_LAYOUTS, decoder_layout
from .removal import (
    MinitronPlan,
    apply_plan_,
    choose_plan,
    current_shape,
    remove_blocks_,
    remove_hidden_channels_,
    remove_kv_groups_,
    resolve_shape,
)
from .search import candidate_shapes, format_search_table, parameters_of, search_shape, target_shapes

logger = logging.getLogger("hf_modelopt")

__all__ = [
    "DECODER_LAYOUTS", "MinitronConfig", "MinitronImportance", "MinitronPlan", "activation_importance",
    "apply_plan_", "calibration_lm_loss", "candidate_shapes", "choose_plan", "current_shape", "decoder_layout",
    "parameters_of", "prune_minitron_", "remove_blocks_", "remove_hidden_channels_", "remove_kv_groups_",
    "resolve_shape", "skipped_block", "target_shapes",
]


@changes_in_place
def prune_minitron_(model, config: MinitronConfig, batches) -> dict:
    """Score `model` on `batches` (dicts with `input_ids`, optionally `attention_mask`) and prune it in place to
    the config's shape, or to the best shape within `target_params` (the search: `search.py`).

    Everything that can be refused (the model, the shape or budget, no batches) is refused first, the model
    unchanged. Returns the report: the importance (with `.table()`), the shapes, the plan (what was kept), the
    removed blocks, the parameter counts, and the search's rows and table when there was one.
    """
    candidates = target_shapes(model, config)
    batches = list(islice(batches or [], config.calibration_batches))
    if not batches:
        raise UserError("Minitron pruning scores from activations: pass batches= (dicts with input_ids, e.g. a "
                        "DataLoader of calibration text)")
    importance = activation_importance(model, batches)
    search = []
    if config.target_params is not None:
        best, search = search_shape(model, importance, batches, candidates, config.depth_importance,
                                    config.target_params_counted)
        shape = {key: best[key] for key in current_shape(model)}
    else:
        (shape,) = candidates
    plan = choose_plan(model, importance, shape, config.depth_importance)
    shape_before, before = current_shape(model), parameter_count(model)
    apply_plan_(model, plan)
    shape_after, after = current_shape(model), parameter_count(model)
    logger.info("Minitron pruning: %s -> %s; %.2f M -> %.2f M parameters\n%s", shape_before, shape_after,
                before / 1e6, after / 1e6, importance.table())
    return {"shape_before": shape_before, "shape_after": shape_after, "plan": plan,
            "dropped_layers": [i for i in range(shape_before["num_hidden_layers"]) if i not in plan.kept_layers],
            "importance": importance, "importance_table": importance.table(),
            "depth_importance": config.depth_importance, "parameters_before": before, "parameters_after": after,
            "search": search,
            "search_table": format_search_table(search, config.target_params_counted) if search else None}


_handles(MinitronConfig)(prune_minitron_)
