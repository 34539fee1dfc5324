"""Metrics of a model on evaluation data (`evaluate_model`).

Classification: accuracy and F1 (binary F1 of class 1 for two labels, macro F1 otherwise), computed with
`evaluate` modules defined here, so that they work offline (the Hub-hosted `evaluate.load("accuracy")`
needs the network).

Causal LM: perplexity = exp(mean next-token negative log-likelihood) over the evaluation text, tokenized
as one sequence (lines joined by newlines) and cut into consecutive, non-overlapping windows of
`data.eval_window` tokens (512 by default). Each window is scored on its own, so the first token of every
window has no context and is not predicted; this is the standard "non-overlapping windows" perplexity.
"""

from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger("hf_modelopt")


def _classification_metric(name: str, compute):
    import datasets
    import evaluate

    class ClassificationMetric(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description=f"{name} of integer class predictions",
                citation="",
                inputs_description="predictions and references: lists of integer class ids",
                features=datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
            )

        def _compute(self, predictions, references):
            return {name: compute(np.asarray(predictions), np.asarray(references))}

    ClassificationMetric.__name__ = name.capitalize()
    return ClassificationMetric()


def _accuracy(predictions, references) -> float:
    return float((predictions == references).mean())


def _f1(predictions, references) -> float:
    labels = [1] if set(np.unique(references)) | set(np.unique(predictions)) <= {0, 1} else np.unique(references)
    scores = []
    for label in labels:
        tp = np.sum((predictions == label) & (references == label))
        predicted, actual = np.sum(predictions == label), np.sum(references == label)
        scores.append(0.0 if tp == 0 else 2 * tp / (predicted + actual))
    return float(np.mean(scores))


def classification_metrics(predictions, references) -> dict[str, float]:
    import evaluate

    combined = evaluate.combine([_classification_metric("accuracy", _accuracy), _classification_metric("f1", _f1)])
    return combined.compute(predictions=list(predictions), references=list(references))


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_classification(model, tokenizer, dataset, batch_size: int) -> dict[str, float]:
    """`dataset` is tokenized (input ids + labels); returns accuracy, F1 and the sample count."""
    import torch
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    device = next(model.parameters()).device
    predictions, references = [], []
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(_batches(dataset, batch_size), total=math.ceil(len(dataset) / batch_size),
                          desc="Evaluating", unit="batch"):
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            inputs = collate(rows)
            labels = inputs.pop("labels")
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
            predictions.extend(logits.argmax(-1).tolist())
            references.extend(labels.tolist())
    metrics = classification_metrics(predictions, references)
    metrics["eval_samples"] = len(references)
    return metrics


def evaluate_perplexity(model, token_ids: list[int], window: int, batch_size: int) -> dict[str, float]:
    """Perplexity over consecutive non-overlapping `window`-token windows of `token_ids`."""
    import torch
    from tqdm.auto import tqdm

    windows = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) > 1]
    device = next(model.parameters()).device
    total_nll, predicted = 0.0, 0
    model.eval()
    # Windows of equal length batch together; only the last one can be shorter.
    groups = [[w for w in windows if len(w) == n] for n in sorted({len(w) for w in windows})]
    with torch.inference_mode(), tqdm(total=len(windows), desc="Perplexity", unit="window") as bar:
        for group in groups:
            for batch in _batches(group, batch_size):
                ids = torch.tensor(batch, device=device)
                logits = model(input_ids=ids).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"
                )
                total_nll += nll.item()
                predicted += ids[:, 1:].numel()
                bar.update(len(batch))
    return {"perplexity": math.exp(total_nll / predicted), "eval_tokens": len(token_ids)}


def infer_task(model) -> str:
    """The task of a model from its class: `causal-lm` or `text-classification`."""
    name = type(getattr(model, "get_base_model", lambda: model)()).__name__
    if name.endswith("ForCausalLM"):
        return "causal-lm"
    if name.endswith("ForSequenceClassification"):
        return "text-classification"
    raise ValueError(f"cannot tell the task of a {name}: pass task='text-classification' or task='causal-lm'")


def evaluate_model(model, tokenizer, data, *, task: str | None = None, config=None) -> dict[str, float]:
    """Metrics of `model` on evaluation data: accuracy and F1 (classification) or perplexity (causal LM).

    Args:
        data: a `DataConfig` (its evaluation split: `eval_file`, `eval_split` or `eval_fraction`), or a
            `datasets.Dataset` of raw rows (text, and labels for classification).
        task: `"text-classification"` or `"causal-lm"`; default: from the model's class.
        config: with a `Dataset`, the `DataConfig` that names its columns and lengths (default `DataConfig()`:
            columns `text` and `label`, 128 tokens, batches of 32).

    Example:
        evaluate_model(model, tokenizer, DataConfig(data_dir="data", eval_file="validation.tsv",
                                                     text_column="sentence"))
    """
    from .data import DataConfig, eval_token_ids, load_split, tokenize_classification

    task = task or infer_task(model)
    if isinstance(data, DataConfig):
        config, dataset = data, load_split(data, "eval")
    else:
        config, dataset = config or DataConfig(), data
    if task == "text-classification":
        encoded = tokenize_classification(dataset, tokenizer, config)
        return evaluate_classification(model, tokenizer, encoded, config.eval_batch_size)
    ids = eval_token_ids(dataset, tokenizer, config)
    return evaluate_perplexity(model, ids, config.eval_window, config.eval_batch_size)
