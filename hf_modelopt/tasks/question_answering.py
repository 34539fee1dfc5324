"""question-answering (extractive, SQuAD-style): the answer is a span of the context; exact match and F1.

Rows hold `question`, `context` and `answers` = {"text": [...], "answer_start": [character offsets]} (column
names: `data.question_column`, `data.context_column`, `data.answers_column`). A context longer than
`data.max_length` tokens (with its question) is cut into overlapping windows (`data.doc_stride` tokens shared);
each training window is labelled with the token positions of the first answer, or with position 0 (the [CLS]
token) when the answer is not inside it. Evaluation scores every window, takes the best valid span (start <=
end, at most `data.max_answer_length` tokens, inside the context) over the windows of an example, and maps it
back to the context's characters through the offset mapping: the standard preprocessing and post-processing of
the transformers question-answering examples.

Metrics are those of the official SQuAD v1.1 evaluation script (https://rajpurkar.github.io/SQuAD-explorer/):
answers are normalised (lower case, punctuation and the articles a / an / the removed, whitespace collapsed),
exact match and token-overlap F1 are taken against the best of the gold answers, and averaged, in percent.
"""

from __future__ import annotations

import collections
import math
import re
import string

import numpy as np
from pydantic import Field

from ..data import DataConfig, require_columns
from .task import Task, batches, local_metric

N_BEST = 20  # start and end candidates per window considered when predicting a span


class QuestionAnsweringData(DataConfig):
    """The `data:` of a question-answering recipe: the question, context and answers columns, and the windows."""

    question_column: str = Field("question", description="question-answering: column holding the question.")
    context_column: str = Field("context", description="question-answering: column holding the passage.")
    answers_column: str = Field("answers", description="question-answering: column holding SQuAD-style answers, "
                                "{'text': [...], 'answer_start': [character offsets]}.")
    doc_stride: int = Field(32, gt=0, description="question-answering: tokens shared by consecutive windows of a "
                            "context longer than max_length.")
    max_answer_length: int = Field(30, gt=0, description="question-answering: longest answer span, in tokens, "
                                   "considered when predicting.")


def _windows(tokenizer, batch, config: QuestionAnsweringData):
    return tokenizer([q.lstrip() for q in batch[config.question_column]], batch[config.context_column],
                     truncation="only_second", max_length=config.max_length, stride=config.doc_stride,
                     return_overflowing_tokens=True, return_offsets_mapping=True)


def prepare_qa_train(dataset, tokenizer, config: QuestionAnsweringData):
    """Windows of question + context with the answer's `start_positions` / `end_positions` (0 when absent)."""
    require_columns(dataset, [config.question_column, config.context_column, config.answers_column], "data")

    def encode(batch):
        encoded = _windows(tokenizer, batch, config)
        starts, ends = [], []
        for i, offsets in enumerate(encoded.pop("offset_mapping")):
            answers = batch[config.answers_column][encoded["overflow_to_sample_mapping"][i]]
            sequence = encoded.sequence_ids(i)
            context = [t for t, s in enumerate(sequence) if s == 1]
            if not answers["text"] or not context:
                starts.append(0), ends.append(0)
                continue
            first_char = answers["answer_start"][0]
            last_char = first_char + len(answers["text"][0])
            first, last = context[0], context[-1]
            if offsets[first][0] > first_char or offsets[last][1] < last_char:  # not (wholly) in this window
                starts.append(0), ends.append(0)
                continue
            start = next(t for t in context if offsets[t][1] > first_char)
            end = next(t for t in reversed(context) if offsets[t][0] < last_char)
            starts.append(start), ends.append(end)
        encoded.pop("overflow_to_sample_mapping")
        encoded["start_positions"], encoded["end_positions"] = starts, ends
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


def prepare_qa_eval(dataset, tokenizer, config: QuestionAnsweringData):
    """Windows with `example_index` and the offset mapping, None outside the context (for post-processing)."""
    require_columns(dataset, [config.question_column, config.context_column], "data")

    def encode(batch, indices):
        encoded = _windows(tokenizer, batch, config)
        encoded["example_index"] = [indices[i] for i in encoded.pop("overflow_to_sample_mapping")]
        encoded["offset_mapping"] = [
            [offset if sequence == 1 else None for offset, sequence in zip(offsets, encoded.sequence_ids(i))]
            for i, offsets in enumerate(encoded["offset_mapping"])]
        return encoded

    return dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                       desc="Tokenizing")


def best_span(start_logits, end_logits, offsets, max_answer_length: int, n_best: int = N_BEST):
    """(score, first char, last char) of the best valid span of one window, or None when none is valid."""
    best = None
    for start in np.argsort(start_logits)[-1 : -n_best - 1 : -1]:
        for end in np.argsort(end_logits)[-1 : -n_best - 1 : -1]:
            if (start >= len(offsets) or end >= len(offsets) or offsets[start] is None or offsets[end] is None
                    or end < start or end - start + 1 > max_answer_length):
                continue
            score = float(start_logits[start] + end_logits[end])
            if best is None or score > best[0]:
                best = (score, offsets[start][0], offsets[end][1])
    return best


def postprocess_qa_predictions(contexts: list[str], windows: list[dict], start_logits, end_logits,
                               max_answer_length: int = 30, n_best: int = N_BEST) -> list[str]:
    """The predicted answer text of each example: its best span over all its windows ("" when none is valid).

    `windows[i]` has `example_index` and `offset_mapping` (None outside the context), as `prepare_qa_eval`
    makes them; `start_logits[i]` / `end_logits[i]` are window i's logits (padding may follow).
    """
    by_example = collections.defaultdict(list)
    for i, window in enumerate(windows):
        by_example[window["example_index"]].append(i)
    answers = []
    for example, context in enumerate(contexts):
        candidates = [best_span(np.asarray(start_logits[i]), np.asarray(end_logits[i]),
                                windows[i]["offset_mapping"], max_answer_length, n_best)
                      for i in by_example.get(example, [])]
        candidates = [c for c in candidates if c is not None]
        answers.append(context[slice(*max(candidates)[1:])] if candidates else "")
    return answers


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, truth: str) -> float:
    predicted, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(predicted) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def _squad(predictions, references) -> dict[str, float]:
    exact = f1 = 0.0
    for prediction, truths in zip(predictions, references):
        exact += max(float(normalize_answer(prediction) == normalize_answer(t)) for t in truths)
        f1 += max(_f1(prediction, t) for t in truths)
    return {"exact_match": 100.0 * exact / len(predictions), "f1": 100.0 * f1 / len(predictions)}


def squad_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Exact match and F1 (percent) of predicted answers against each example's gold answers (SQuAD v1.1)."""
    import datasets

    features = {"predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string"))}
    metric = local_metric("squad", features, _squad, "SQuAD v1.1 exact match and F1")
    return metric.compute(predictions=predictions, references=references)


def collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


def evaluate(model, tokenizer, dataset, config: QuestionAnsweringData) -> dict[str, float]:
    """Exact match and F1 of the predicted spans, and the sample count."""
    import torch
    from tqdm.auto import tqdm

    require_columns(dataset, [config.answers_column], "data")
    windows = prepare_qa_eval(dataset, tokenizer, config)
    inputs_only = windows.remove_columns(["example_index", "offset_mapping"])
    collate, device = collator(tokenizer), next(model.parameters()).device
    starts, ends = [], []
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(batches(inputs_only, config.eval_batch_size),
                          total=math.ceil(len(inputs_only) / config.eval_batch_size), desc="Evaluating", unit="batch"):
            inputs = collate([dict(zip(batch, values)) for values in zip(*batch.values())])
            outputs = model(**{k: v.to(device) for k, v in inputs.items()})
            starts.extend(outputs.start_logits.float().cpu().numpy())
            ends.extend(outputs.end_logits.float().cpu().numpy())
    predicted = postprocess_qa_predictions(dataset[config.context_column], list(windows), starts, ends,
                                           config.max_answer_length)
    references = [answers["text"] for answers in dataset[config.answers_column]]
    return {**squad_metrics(predicted, references), "eval_samples": len(references)}


def columns(config: QuestionAnsweringData) -> dict[str, str | None]:
    return {"data.question_column": config.question_column, "data.context_column": config.context_column,
            "data.answers_column": config.answers_column}


TASK = Task(
    name="question-answering",
    auto_class="AutoModelForQuestionAnswering",
    peft_auto_class="AutoPeftModelForQuestionAnswering",
    pipeline_tag="question-answering",
    model_kind="question-answering model",
    head_mapping="MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    head_suffixes=("ForQuestionAnswering",),
    logits="span",
    data_config=QuestionAnsweringData,
    label_keys=("start_positions", "end_positions"),
    columns=columns,
    prepare_train=prepare_qa_train,
    collator=collator,
    evaluate=evaluate,
    main_metric="f1",
    head_noun="span head",
)
