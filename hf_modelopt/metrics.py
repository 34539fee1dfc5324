"""Metrics of a model on evaluation data (`evaluate_model`); each task computes its own (`hf_modelopt.tasks`).

text-classification: accuracy and F1; causal-lm: perplexity over non-overlapping windows; see the task modules
for the others and for how each metric is computed.
"""

from __future__ import annotations

import logging

from .tasks import get_task, infer_task  # noqa: F401  (infer_task: re-exported)
from .tasks.causal_lm import evaluate_perplexity  # noqa: F401  (re-exported)
from .tasks.text_classification import classification_metrics, evaluate_classification  # noqa: F401

logger = logging.getLogger("hf_modelopt")


def evaluate_model(model, tokenizer, data, *, task: str | None = None, config=None) -> dict[str, float]:
    """Metrics of `model` on evaluation data, those of its task (accuracy and F1, perplexity, ...).

    Args:
        tokenizer: the model's processor: its tokenizer, or its image processor for image tasks.
        data: the task's data settings (`TextClassificationData`, ... from `hf_modelopt.tasks`; its evaluation
            split: `eval_file`, `eval_split` or `eval_fraction`), or a `datasets.Dataset` of raw rows (text, and
            labels for classification).
        task: a registered task name (`hf_modelopt.tasks.TASKS`); default: from the model's class.
        config: with a `Dataset`, the task's data settings that name its columns and lengths (default: the task's
            defaults, e.g. columns `text` and `label`, 128 tokens, batches of 32).

    A plain `DataConfig` (or another task's) is read as the task's: a key the task does not read is refused.

    Example:
        evaluate_model(model, tokenizer, TextClassificationData(data_dir="data", eval_file="validation.tsv",
                                                                text_column="sentence"))
    """
    from .data import DataConfig, load_split
    from .extras import require_extra

    spec = get_task(task or infer_task(model))
    require_extra(f"evaluating a {spec.name} model", *spec.packages)
    if isinstance(data, DataConfig):
        config, dataset = spec.data_settings(data), load_split(data, "eval")
    else:
        config, dataset = spec.data_settings(config), data
    return spec.evaluate(model, tokenizer, dataset, config)
