"""causal-lm: next-token prediction; perplexity.

Perplexity = exp(mean next-token negative log-likelihood) over the evaluation text, tokenized as one sequence
(lines joined by newlines) and cut into consecutive, non-overlapping windows of `data.eval_window` tokens (512
by default). Each window is scored on its own, so the first token of every window has no context and is not
predicted; this is the standard "non-overlapping windows" perplexity.
"""

from __future__ import annotations

import math

from pydantic import Field

from ..data import DataError, TextColumn, require_columns
from .task import Task, batches


class CausalLMData(TextColumn):
    """The `data:` of a causal-lm recipe: the text column, and the perplexity windows of the evaluation."""

    eval_window: int = Field(
        512, gt=1, description="causal-lm: perplexity is computed over non-overlapping windows of this many tokens."
    )
    max_eval_tokens: int | None = Field(None, gt=1, description="causal-lm: evaluate on the first N tokens only.")


def tokenize_causal_lm(dataset, tokenizer, config: CausalLMData):
    """Tokenize text, concatenate it and cut it into `max_length` blocks whose labels are the inputs."""
    require_columns(dataset, [config.text_column], "data")
    block = config.max_length

    def encode(batch):
        return tokenizer([text for text in batch[config.text_column] if text.strip()])

    def group(batch):
        ids = [token for sequence in batch["input_ids"] for token in sequence]
        usable = len(ids) // block * block  # the ragged tail of each map batch is dropped
        blocks = [ids[i : i + block] for i in range(0, usable, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": blocks}

    tokens = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")
    blocks = tokens.map(group, batched=True, batch_size=1000, remove_columns=tokens.column_names, desc="Grouping")
    if len(blocks) == 0:
        raise DataError(f"the text holds fewer than max_length={block} tokens")
    return blocks


def eval_token_ids(dataset, tokenizer, config: CausalLMData) -> list[int]:
    """The evaluation text as one token sequence (lines joined by newlines), cut to `max_eval_tokens`."""
    require_columns(dataset, [config.text_column], "data")
    text = "\n".join(dataset[config.text_column])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if config.max_eval_tokens is not None:
        ids = ids[: config.max_eval_tokens]
    if len(ids) < 2:
        raise DataError("the evaluation text holds fewer than 2 tokens")
    return ids


def eval_windows(token_ids: list[int], window: int) -> list[list[int]]:
    """Consecutive non-overlapping `window`-token windows of `token_ids`; the last may be shorter (one of a single
    token, which predicts nothing, is left out)."""
    windows = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    return [w for w in windows if len(w) > 1]


def evaluate_perplexity(model, token_ids: list[int], window: int, batch_size: int) -> dict[str, float]:
    """Perplexity over `eval_windows(token_ids, window)`."""
    import torch
    from tqdm.auto import tqdm

    windows = eval_windows(token_ids, window)
    device = next(model.parameters()).device
    total_nll, predicted = 0.0, 0
    model.eval()
    # Windows of equal length batch together; only the last one can be shorter.
    groups = [[w for w in windows if len(w) == n] for n in sorted({len(w) for w in windows})]
    with torch.inference_mode(), tqdm(total=len(windows), desc="Perplexity", unit="window") as bar:
        for group in groups:
            for batch in batches(group, batch_size):
                ids = torch.tensor(batch, device=device)
                logits = model(input_ids=ids).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"
                )
                total_nll += nll.item()
                predicted += ids[:, 1:].numel()
                bar.update(len(batch))
    return {"perplexity": math.exp(total_nll / predicted), "eval_tokens": len(token_ids)}


def collator(tokenizer):
    from transformers import default_data_collator

    return default_data_collator  # the blocks all have max_length tokens


def evaluate(model, tokenizer, dataset, config: CausalLMData) -> dict[str, float]:
    ids = eval_token_ids(dataset, tokenizer, config)
    return evaluate_perplexity(model, ids, config.eval_window, config.eval_batch_size)


def columns(config: CausalLMData) -> dict[str, str | None]:
    return {"data.text_column": config.text_column}


def eval_notes(data: CausalLMData) -> list[str]:
    return [f"first {data.max_eval_tokens:,} tokens" if data.max_eval_tokens else "",
            f"{data.eval_window}-token windows"]


TASK = Task(
    name="causal-lm",
    auto_class="AutoModelForCausalLM",
    peft_auto_class="AutoPeftModelForCausalLM",
    pipeline_tag="text-generation",
    model_kind="causal LM",
    head_mapping="MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    head_suffixes=("ForCausalLM", "LMHeadModel"),  # (GPT2LMHeadModel)
    logits="decoder-token",
    data_config=CausalLMData,
    columns=columns,
    prepare_train=tokenize_causal_lm,
    collator=collator,
    evaluate=evaluate,
    main_metric="perplexity",
    lower_is_better=True,
    pretrained_head=True,
    token_level_loss=True,
    eval_notes=eval_notes,
    head_noun="language-model head",
)
