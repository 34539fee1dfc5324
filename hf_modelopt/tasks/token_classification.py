"""token-classification (NER-style): one label per word; seqeval precision, recall, F1 and accuracy.

Rows hold a list of words (`data.tokens_column`, default `tokens`) and one integer label per word
(`data.tags_column`, default `ner_tags`). After tokenization each word's label goes to its first sub-token;
the other sub-tokens and the special tokens get -100, so neither the loss, the metrics nor knowledge
distillation count them. Metrics are entity-level (seqeval, https://github.com/chakki-works/seqeval, as
`evaluate.load("seqeval")` computes them, but defined here so that they work offline) over the label names
`data.label_names`, else the model config's `id2label`.
"""

from __future__ import annotations

import math

from pydantic import Field

from ..data import DataConfig, DataError, require_columns
from .task import Task, batches, local_metric


class TokenClassificationData(DataConfig):
    """The `data:` of a token-classification recipe: the words and tags columns, and the names of the tags."""

    tokens_column: str = Field("tokens", description="token-classification: column holding each example's words "
                               "(a list of strings).")
    tags_column: str = Field("ner_tags", description="token-classification: column holding one integer label per "
                             "word.")
    label_names: list[str] | None = Field(None, description="token-classification: the name of each label id, in "
                                          "IOB form (`O`, `B-PER`, `I-PER`, ...) for seqeval; default: the model "
                                          "config's id2label.")


def align_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
    """Each word's label on its first sub-token; -100 on later sub-tokens and special tokens (word id None)."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(-100 if word is None or word == previous else word_labels[word])
        previous = word
    return labels


def tokenize_token_classification(dataset, tokenizer, config: TokenClassificationData):
    """Tokenize pre-split words to `max_length`, with labels aligned to the first sub-token of each word."""
    require_columns(dataset, [config.tokens_column, config.tags_column], "data")

    def encode(batch):
        encoded = tokenizer(batch[config.tokens_column], is_split_into_words=True, truncation=True,
                            max_length=config.max_length)
        tags = batch[config.tags_column]
        encoded["labels"] = [align_labels(encoded.word_ids(i), row) for i, row in enumerate(tags)]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


def count_labels(dataset, config: TokenClassificationData) -> int:
    """The number of label ids: `label_names` when given, else the largest tag + 1."""
    tags = {tag for row in dataset[config.tags_column] for tag in row}
    if not all(isinstance(tag, int) and tag >= 0 for tag in tags):
        raise DataError(f"column {config.tags_column!r} must hold lists of integer label ids >= 0, "
                        f"found {sorted(tags, key=str)[:5]}")
    largest = max(tags, default=0) + 1
    if config.label_names is not None:
        if largest > len(config.label_names):
            raise DataError(f"column {config.tags_column!r} holds label id {largest - 1}, but data.label_names "
                            f"names only {len(config.label_names)} labels")
        return len(config.label_names)
    return largest


def _seqeval(predictions, references) -> dict[str, float]:
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {"precision": float(precision_score(references, predictions, zero_division=0)),
            "recall": float(recall_score(references, predictions, zero_division=0)),
            "f1": float(f1_score(references, predictions, zero_division=0)),
            "accuracy": float(accuracy_score(references, predictions))}


def seqeval_metrics(predictions: list[list[str]], references: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 and tag accuracy of IOB tag sequences (seqeval's default mode)."""
    import datasets

    from ..extras import require_extra

    require_extra("token-classification metrics", *TASK.packages)

    features = {"predictions": datasets.Sequence(datasets.Value("string")),
                "references": datasets.Sequence(datasets.Value("string"))}
    metric = local_metric("seqeval", features, _seqeval, "entity-level precision, recall, F1 (seqeval)")
    return metric.compute(predictions=predictions, references=references)


def label_names(model, config: TokenClassificationData) -> list[str]:
    """`data.label_names`, else the model's `id2label` (names like LABEL_0 then stand for themselves)."""
    if config.label_names is not None:
        return list(config.label_names)
    id2label = model.config.id2label or {}
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)]


def collator(tokenizer):
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer)  # pads the labels with -100


def evaluate(model, tokenizer, dataset, config: TokenClassificationData) -> dict[str, float]:
    """seqeval metrics of the model's first-sub-token predictions, and the sample count."""
    import torch
    from tqdm.auto import tqdm

    rows = tokenize_token_classification(dataset, tokenizer, config)
    names, collate = label_names(model, config), collator(tokenizer)
    device = next(model.parameters()).device
    predictions, references = [], []
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(batches(rows, config.eval_batch_size), total=math.ceil(len(rows) / config.eval_batch_size),
                          desc="Evaluating", unit="batch"):
            inputs = collate([dict(zip(batch, values)) for values in zip(*batch.values())])
            labels = inputs.pop("labels")
            predicted = model(**{k: v.to(device) for k, v in inputs.items()}).logits.argmax(-1).cpu()
            for row_predictions, row_labels in zip(predicted.tolist(), labels.tolist()):
                kept = [(p, t) for p, t in zip(row_predictions, row_labels) if t != -100]
                predictions.append([names[p] for p, _ in kept])
                references.append([names[t] for _, t in kept])
    return {**seqeval_metrics(predictions, references), "eval_samples": len(references)}


def columns(config: TokenClassificationData) -> dict[str, str | None]:
    return {"data.tokens_column": config.tokens_column, "data.tags_column": config.tags_column}


TASK = Task(
    name="token-classification",
    auto_class="AutoModelForTokenClassification",
    peft_auto_class="AutoPeftModelForTokenClassification",
    pipeline_tag="token-classification",
    model_kind="token classifier",
    head_mapping="MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    head_suffixes=("ForTokenClassification",),
    logits="token",
    data_config=TokenClassificationData,
    columns=columns,
    prepare_train=tokenize_token_classification,
    collator=collator,
    evaluate=evaluate,
    main_metric="f1",
    count_labels=count_labels,
    token_level_loss=True,
    head_noun="token classification head",
    packages=("seqeval",),  # the metrics
)
