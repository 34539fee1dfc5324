"""seq2seq: text-to-text generation (T5, BART); ROUGE-1/2/L and BLEU of greedy generations.

Rows have a source text (`data.text_column`, after `data.source_prefix`, cut to `data.max_length` tokens) and a
target text (`data.target_column`, cut to `data.max_target_length` tokens). Training rows hold the target's
tokens as `labels`, padded with -100 by the collator; the model makes its decoder inputs from them (the labels
shifted right behind the decoder start token), and so does knowledge distillation (`decoder_inputs_from_labels`),
so that teacher and student read the same decoder inputs.

Evaluation generates greedily (one beam, no sampling, at most `data.max_target_length` new tokens) and scores
the decoded generations against the targets: ROUGE-1, ROUGE-2 and ROUGE-L F-measures (Lin 2004,
https://aclanthology.org/W04-1013/, as Google's `rouge_score` computes them: lowercased alphanumeric words, no
stemming), averaged over examples, in [0, 1]; and corpus BLEU (Papineni et al. 2002, as `sacrebleu` computes it
with its default 13a tokenization), in [0, 100]. Both are `evaluate` metrics defined here, so they work offline
(the Hub-hosted `evaluate.load("rouge")` needs the network).
"""

from __future__ import annotations

import math

from pydantic import Field

from ..data import TextColumn, require_columns
from .task import PROBE_TEXTS, Task, batches, local_metric, random_token_inputs

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# The encoder's inputs: a tokenizer made for other models also returns token_type_ids, which T5 and BART refuse.
ENCODER_INPUTS = ("input_ids", "attention_mask")


class Seq2SeqData(TextColumn):
    """The `data:` of a seq2seq recipe: the source (`text_column`) and target columns, the source prefix and the
    target length."""

    target_column: str = Field(
        "target", description="seq2seq: column holding the target text (the source text is `text_column`, cut to "
        "`max_length` tokens).",
    )
    source_prefix: str = Field(
        "", description="seq2seq: text put before every source text, e.g. T5's task prefix `summarize: `.",
    )
    max_target_length: int = Field(
        128, gt=0, description="seq2seq: tokens per target text in training; evaluation generates at most this "
        "many new tokens.",
    )


def source_texts(rows, config: Seq2SeqData) -> list[str]:
    """The source texts of a batch of rows, each after `source_prefix`."""
    return [config.source_prefix + text for text in rows[config.text_column]]


def tokenize_seq2seq(dataset, tokenizer, config: Seq2SeqData):
    """Tokenize source texts to `max_length` and targets to `max_target_length` (as `labels`); padding is left to
    the collator, per batch."""
    require_columns(dataset, [config.text_column, config.target_column], "data")

    def encode(rows):
        sources = tokenizer(source_texts(rows, config), truncation=True, max_length=config.max_length)
        targets = tokenizer(text_target=rows[config.target_column], truncation=True,
                            max_length=config.max_target_length)
        return {**{key: sources[key] for key in ENCODER_INPUTS}, "labels": targets["input_ids"]}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")


def collator(tokenizer):
    """Pads sources with the pad token and labels with -100 (which every loss ignores)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)


def decoder_inputs_from_labels(labels, config):
    """The decoder inputs a model makes from `labels` when given none: the labels shifted one position right
    behind `config.decoder_start_token_id`, -100 replaced by the pad token (T5's `_shift_right`, BART's
    `shift_tokens_right`)."""
    start, pad = config.decoder_start_token_id, config.pad_token_id
    if start is None or pad is None:
        raise ValueError(f"{config.model_type}: the config sets no decoder_start_token_id / pad_token_id, which "
                         "seq2seq decoder inputs are made with; set them in the model's config")
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad)


def generate_texts(model, tokenizer, sources: list[str], config: Seq2SeqData) -> list[str]:
    """Greedy generations for `sources`, decoded without special tokens, `eval_batch_size` sources at a time."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    generated = []
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(batches(sources, config.eval_batch_size), total=math.ceil(len(sources) /
                          config.eval_batch_size), desc="Generating", unit="batch"):
            encoded = tokenizer(batch, padding=True, truncation=True, max_length=config.max_length,
                                return_tensors="pt")
            output = model.generate(**{key: encoded[key].to(device) for key in ENCODER_INPUTS},
                                    max_new_tokens=config.max_target_length, do_sample=False, num_beams=1)
            generated.extend(tokenizer.batch_decode(output, skip_special_tokens=True))
    return [text.strip() for text in generated]


def _rouge(predictions, references) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {name: sum(score[name].fmeasure for score in scores) / len(scores) for name in ROUGE_TYPES}


def _bleu(predictions, references) -> dict[str, float]:
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score}


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (mean over examples, 0..1) and corpus BLEU (0..100) of texts against references."""
    import datasets
    import evaluate

    from ..extras import require_extra

    require_extra("seq2seq metrics", *TASK.packages)

    features = {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
    combined = evaluate.combine([
        local_metric("rouge", features, _rouge, "ROUGE-1/2/L F-measures (rouge_score), mean over examples"),
        local_metric("bleu", features, _bleu, "corpus BLEU (sacrebleu, 13a tokenization)"),
    ])
    return combined.compute(predictions=list(predictions), references=list(references))


def evaluate(model, tokenizer, dataset, config: Seq2SeqData) -> dict[str, float]:
    require_columns(dataset, [config.text_column, config.target_column], "data")
    predictions = generate_texts(model, tokenizer, source_texts(dataset, config), config)
    metrics = generation_metrics(predictions, list(dataset[config.target_column]))
    metrics["eval_samples"] = len(predictions)
    return metrics


def probe_batch(tokenizer, max_length: int = 32) -> dict:
    """Padded sources and, as decoder inputs, the first tokens of the texts in reverse order: equal in length (so
    no decoder position is padding) and independent of the model's decoder start token."""
    import torch

    sources = tokenizer(list(PROBE_TEXTS), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    targets = tokenizer(list(reversed(PROBE_TEXTS)), add_special_tokens=False)["input_ids"]
    length = min(8, *(len(ids) for ids in targets))
    return {**{key: sources[key] for key in ENCODER_INPUTS},
            "decoder_input_ids": torch.tensor([ids[:length] for ids in targets])}


def random_inputs(model, batch_size: int, seq_len: int, generator) -> dict:
    """Random source tokens, and as many target tokens as decoder inputs: one decoder pass over `seq_len`."""
    inputs = random_token_inputs(model, batch_size, seq_len, generator)
    return {**inputs, "decoder_input_ids": inputs["input_ids"]}


def columns(config: Seq2SeqData) -> dict[str, str | None]:
    return {"data.text_column": config.text_column, "data.target_column": config.target_column}


def eval_notes(data: Seq2SeqData) -> list[str]:
    return [f"greedy generation of at most {data.max_target_length} tokens",
            f"source prefix {data.source_prefix!r}" if data.source_prefix else ""]


TASK = Task(
    name="seq2seq",
    auto_class="AutoModelForSeq2SeqLM",
    peft_auto_class="AutoPeftModelForSeq2SeqLM",
    pipeline_tag="text2text-generation",
    model_kind="seq2seq model",
    head_mapping="MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    head_suffixes=("ForConditionalGeneration", "ForSeq2SeqLM"),
    logits="seq2seq-token",
    data_config=Seq2SeqData,
    encoder_decoder=True,
    columns=columns,
    prepare_train=tokenize_seq2seq,
    collator=collator,
    evaluate=evaluate,
    main_metric="rougeL",
    pretrained_head=True,
    # (T5 and BART average their loss over their own batch's tokens: not a sum over tokens of all processes)
    token_level_loss=False,
    probe_batch=probe_batch,
    random_inputs=random_inputs,
    eval_notes=eval_notes,
    head_noun="language-model head",
    packages=("rouge_score", "sacrebleu"),  # the metrics, computed locally (evaluate's Hub metrics need the network)
)
