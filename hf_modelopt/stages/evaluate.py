"""The `evaluate` stage: `evaluate_model` on the recipe's evaluation data, written to the stage folder."""

from __future__ import annotations

import json
import logging

from ..metrics import evaluate_model
from . import ModelState, StageConfig, StageContext, ensure_loaded, register_stage

logger = logging.getLogger("hf_modelopt")


class EvaluateConfig(StageConfig):
    """Measure the current model on the recipe's evaluation data (`data.eval_file` or `data.eval_split`)."""

    requires_data = ("eval",)


@register_stage("evaluate", EvaluateConfig, changes_model=False, produces_metrics=True)
def evaluate_stage(state: ModelState, config: EvaluateConfig, context: StageContext) -> ModelState:
    ensure_loaded(state, context.settings)
    metrics = evaluate_model(state.model, state.tokenizer, context.settings.data, task=context.settings.task)
    (context.stage_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("%s: %s", context.stage_name, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    state.metrics = metrics
    return state
