"""`Task`: what hf-modelopt needs to know about one task, and the pieces that several tasks share."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

# The shape of a task's logits, which decides how knowledge distillation compares teacher and student:
# "sequence": one distribution per example (classifiers); "token": one per input token (token classifiers);
# "span": a start and an end distribution over the positions of the input (extractive QA);
# "decoder-token": one per token, predicting the next one (causal LMs);
# "seq2seq-token": one per decoder position, predicting that position's label, not shifted (encoder-decoders).
LogitsShape = Literal["sequence", "token", "span", "decoder-token", "seq2seq-token"]

# Texts of the reload check's probe batch (`export.verify`): padded together, so padding paths run too.
PROBE_TEXTS = (
    "a gripping , beautifully acted film .",
    "the plot is thin and the jokes fall flat .",
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "It was the best of times, it was the worst of times",
)


def text_probe_batch(tokenizer, max_length: int = 32) -> dict:
    """The fixed probe batch of a text model (padded, so padding paths are exercised too)."""
    return dict(tokenizer(list(PROBE_TEXTS), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))


def random_token_inputs(model, batch_size: int, seq_len: int, generator) -> dict:
    """Random token ids (above the first few, often special, ids) and a full attention mask: what a text model
    runs on for timing and peak memory."""
    import torch

    ids = torch.randint(5, model.config.vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def no_eval_notes(data) -> list[str]:
    return []


@functools.cache
def auto_mapped_classes(mapping: str | None = None) -> frozenset[str]:
    """Model class names that one of transformers' auto-mappings lists (`"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"`), or
    that any of them lists (None)."""
    from transformers.models.auto import modeling_auto

    names = [mapping] if mapping else [name for name in dir(modeling_auto) if name.endswith("_MAPPING_NAMES")]
    classes = set()
    for name in names:
        for listed in getattr(modeling_auto, name, {}).values():
            classes.update((listed,) if isinstance(listed, str) else listed)  # a few list several classes
    return frozenset(classes)


@dataclass(frozen=True)
class Task:
    """One task: its model class, data, training rows, evaluation and logits (see `hf_modelopt.tasks`).

    The callables take the raw `datasets.Dataset` rows, the model's processor (a tokenizer, or an image
    processor for vision tasks: the project calls it `tokenizer` throughout) and the recipe's data settings, an
    instance of the task's own `DataConfig` subclass (`data_config`: the columns and lengths this task reads).
    """

    name: str
    auto_class: str  # transformers Auto class that loads a model with this task's head
    peft_auto_class: str  # peft's AutoPeftModel class for adapters on such a model
    pipeline_tag: str  # the Hub's pipeline tag, for the model card
    model_kind: str  # how one-line errors name a model of this task ("sequence classifier")
    head_mapping: str  # transformers' auto-mapping that lists this head's model classes (in modeling_auto)
    head_suffixes: tuple[str, ...]  # unlisted (remote-code) classes with this head end with one of these
    logits: LogitsShape
    data_config: type  # its `DataConfig` subclass: the recipe's `data:` keys this task reads, and no others
    columns: Callable  # (DataConfig) -> {recipe key: column the data must have, or None when unused}
    prepare_train: Callable  # (dataset, processor, DataConfig) -> model-input rows with their labels
    collator: Callable  # (processor) -> the data collator of those rows
    evaluate: Callable  # (model, processor, raw evaluation dataset, DataConfig) -> metrics dict
    main_metric: str  # the metric of `evaluate` that ranks models (the benchmark's column and plots)
    lower_is_better: bool = False  # whether a lower `main_metric` is better (perplexity)
    count_labels: Callable | None = None  # (dataset, DataConfig) -> number of classes; None: no class labels
    processor_class: str = "AutoTokenizer"  # transformers class that loads the model's processor
    encoder_decoder: bool = False  # its models have an encoder and a decoder stack (what `compat` refuses by)
    pretrained_head: bool = False  # the head comes from pretraining (an LM head): other tasks' checkpoints lack it
    accepts_unlabelled_text: bool = False  # KD may add unlabelled text rows (transfer text, augmented copies)
    token_level_loss: bool = False  # the loss is a mean over tokens (Trainer may average tokens across devices)
    probe_batch: Callable = text_probe_batch  # (processor) -> a fixed batch of model inputs (reload check)
    # (model, batch size, sequence length, torch.Generator) -> random model inputs (latency and memory figures)
    random_inputs: Callable = random_token_inputs
    eval_notes: Callable = no_eval_notes  # (DataConfig) -> limits of the evaluation, for the model card
    head_noun: str = field(default="head")  # "language-model head", in errors about untrained heads
    # Optional packages (import names, `hf_modelopt.extras`) its metrics or data need; checked before any work.
    packages: tuple[str, ...] = ()
    label_keys: tuple[str, ...] = ("labels",)  # the keys of a training row that are targets, not model inputs

    def data_settings(self, config=None):
        """`config` (a `DataConfig` of any class, or None: the defaults) as this task's data class; keys another
        task reads are refused (pydantic's `extra_forbidden`)."""
        if config is None:
            return self.data_config()
        if isinstance(config, self.data_config):
            return config
        return self.data_config(**config.model_dump(exclude_unset=True))

    def calibration_batches(self, dataset, processor, data, count: int, batch_size: int = 8):
        """The model inputs of the first `count` training rows (`prepare_train` without `label_keys`), collated into
        batches of tensors: what calibration (one-shot pruning) runs the model on."""
        rows = self.prepare_train(dataset, processor, data)
        rows = rows.remove_columns([key for key in self.label_keys if key in rows.column_names])
        rows = rows.select(range(min(count, len(rows))))
        collate = self.collator(processor)
        for batch in batches(rows, batch_size):
            yield collate([dict(zip(batch, values)) for values in zip(*batch.values())])

    def recognises(self, class_name: str) -> bool:
        """Whether a model class (`BertForTokenClassification`) has this task's head.

        As transformers' auto-mapping for the head says, for the classes the auto-mappings list: a listed class of
        another head is not this task's even when its name looks so (`LlavaForConditionalGeneration` is
        image-text-to-text, not seq2seq). Classes no auto-mapping lists (remote code) go by transformers' naming.
        """
        if class_name in auto_mapped_classes(self.head_mapping):
            return True
        return class_name not in auto_mapped_classes() and class_name.endswith(self.head_suffixes)

    def logits_of(self, outputs):
        """The model output as one tensor: start and end logits stacked on the last axis for "span" tasks."""
        if self.logits == "span":
            import torch

            return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1)
        return outputs.logits


def batches(items, size: int):
    """Consecutive slices of `size` rows (a `Dataset` slice is a dict of columns)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def local_metric(name: str, features: dict, compute: Callable, description: str = ""):
    """An `evaluate.Metric` computed here, so that it works offline (`evaluate.load(name)` needs the Hub).

    `features` maps the inputs (`predictions`, `references`) to `datasets` feature types; `compute` takes them
    as keyword arguments and returns the metrics dict.
    """
    import datasets
    import evaluate

    class LocalMetric(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(description=description or name, citation="",
                                       inputs_description=", ".join(features),
                                       features=datasets.Features(features))

        def _compute(self, **inputs):
            return compute(**inputs)

    LocalMetric.__name__ = "".join(part.capitalize() for part in name.split("_"))
    return LocalMetric()
