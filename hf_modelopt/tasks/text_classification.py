"""text-classification: one class per text (or text pair); accuracy and F1.

F1 is the binary F1 of class 1 for two labels, the macro F1 otherwise; both are `evaluate` metrics defined
here, so that they work offline (the Hub-hosted `evaluate.load("accuracy")` needs the network).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from ..data import LabelColumn, TextColumn, num_labels, require_columns
from .task import Task, batches, local_metric


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


def _class_metric(name: str, score):
    import datasets

    def compute(predictions, references):
        return {name: score(np.asarray(predictions), np.asarray(references))}

    features = {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
    return local_metric(name, features, compute, f"{name} of integer class predictions")


def classification_metrics(predictions, references) -> dict[str, float]:
    """Accuracy and F1 of integer class predictions (shared by the tasks that predict one class per example)."""
    import evaluate

    combined = evaluate.combine([_class_metric("accuracy", _accuracy), _class_metric("f1", _f1)])
    return combined.compute(predictions=list(predictions), references=list(references))


def predict_classes(model, rows, collate, batch_size: int) -> dict[str, float]:
    """Accuracy, F1 and the sample count of a one-class-per-example model over prepared `rows` (with labels)."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    predictions, references = [], []
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(batches(rows, batch_size), total=math.ceil(len(rows) / batch_size),
                          desc="Evaluating", unit="batch"):
            inputs = collate([dict(zip(batch, values)) for values in zip(*batch.values())])
            labels = inputs.pop("labels")
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
            predictions.extend(logits.argmax(-1).tolist())
            references.extend(labels.tolist())
    metrics = classification_metrics(predictions, references)
    metrics["eval_samples"] = len(references)
    return metrics


class TextClassificationData(TextColumn, LabelColumn):
    """The `data:` of a text-classification recipe: the text (or text pair) and label columns."""

    text_pair_column: str | None = Field(None, description="Second text column for sentence-pair tasks.")


def tokenize_classification(dataset, tokenizer, config: TextClassificationData):
    """Tokenize text (or text pairs) to `max_length`; padding is left to the collator, per batch."""
    require_columns(dataset, [config.text_column, config.text_pair_column, config.label_column], "data")

    def encode(batch):
        pair = batch[config.text_pair_column] if config.text_pair_column else None
        encoded = tokenizer(batch[config.text_column], pair, truncation=True, max_length=config.max_length)
        encoded["labels"] = batch[config.label_column]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


def collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def evaluate_classification(model, tokenizer, dataset, batch_size: int) -> dict[str, float]:
    """`dataset` is tokenized (input ids + labels); returns accuracy, F1 and the sample count."""
    return predict_classes(model, dataset, collator(tokenizer), batch_size)


def evaluate(model, tokenizer, dataset, config: TextClassificationData) -> dict[str, float]:
    encoded = tokenize_classification(dataset, tokenizer, config)
    return evaluate_classification(model, tokenizer, encoded, config.eval_batch_size)


def columns(config: TextClassificationData) -> dict[str, str | None]:
    return {"data.text_column": config.text_column, "data.text_pair_column": config.text_pair_column,
            "data.label_column": config.label_column}


TASK = Task(
    name="text-classification",
    auto_class="AutoModelForSequenceClassification",
    peft_auto_class="AutoPeftModelForSequenceClassification",
    pipeline_tag="text-classification",
    model_kind="sequence classifier",
    head_mapping="MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    head_suffixes=("ForSequenceClassification",),
    logits="sequence",
    data_config=TextClassificationData,
    columns=columns,
    prepare_train=tokenize_classification,
    collator=collator,
    evaluate=evaluate,
    main_metric="accuracy",
    count_labels=num_labels,
    accepts_unlabelled_text=True,
    head_noun="classification head",
)
