"""Text the teacher writes itself, for causal-LM distillation without a corpus (or beside a small one).

Prompts are the first `prompt_tokens` tokens of the training text's lines (in order, lines too short skipped); the
teacher continues each by sampling (`temperature`, `top_p`, a fixed seed) for `new_tokens` tokens. The texts go
into one JSON file, written once by the main process and reused by every later run whose teacher, prompts and
settings are the same (a fingerprint of them is stored with the texts); anything else writes it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..errors import UserError

logger = logging.getLogger("hf_modelopt")

TEXT_FILE = "teacher_text.json"
MAX_TEXT_FILE_BYTES = 1 << 30  # a file this project reads back: checked before it is read


class GeneratedTextConfig(BaseModel):
    """`distillation.generated_text`: KD on text the teacher samples from prompts cut from the training text."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(64, gt=0, le=1_000_000, description="Texts to generate (one per prompt).")
    prompt_tokens: int = Field(16, gt=0, description="Tokens of each prompt: the start of a training-text line.")
    new_tokens: int = Field(128, gt=0, le=32_768, description="Tokens the teacher writes after each prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens of this mass.")
    batch_size: int = Field(8, gt=0, description="Prompts generated together.")
    seed: int = Field(0, description="Seed of the sampling.")
    only: bool = Field(False, description="Train on the generated text alone (the training text gives the prompts "
                       "only); default: added to the training text.")
    file: str | None = Field(None, description=f"The cache file (JSON); default {TEXT_FILE} in the KD work folder "
                             "(a recipe stage's shared folder, kept between runs).")


def teacher_prompts(texts: list[str], tokenizer, config: GeneratedTextConfig) -> list[list[int]]:
    """The first `prompt_tokens` tokens of each line of `texts` that has that many, in order, up to `samples`."""
    prompts = []
    for text in texts:
        ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"] if text.strip() else []
        if len(ids) >= config.prompt_tokens:
            prompts.append(ids[: config.prompt_tokens])
            if len(prompts) == config.samples:
                break
    if not prompts:
        raise UserError(f"distillation.generated_text: no line of the training text has prompt_tokens="
                        f"{config.prompt_tokens} tokens")
    if len(prompts) < config.samples:
        logger.warning("generated_text: the training text has %d lines of %d tokens: %d prompts, not %d",
                       len(prompts), config.prompt_tokens, len(prompts), config.samples)
    return prompts


def fingerprint(teacher, prompts: list[list[int]], config: GeneratedTextConfig) -> str:
    """What the texts depend on: the teacher (its config and a checksum of every weight), the prompts and the
    sampling settings."""
    import torch

    with torch.no_grad():
        checksum = sum(float(p.detach().double().sum()) for p in teacher.parameters())
    settings = config.model_dump(exclude={"only", "file", "batch_size"})  # (these do not change the texts)
    blob = json.dumps({"teacher": teacher.config.to_dict(), "weights": repr(checksum), "prompts": prompts,
                       "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def generate_teacher_text(teacher, tokenizer, prompts: list[list[int]], config: GeneratedTextConfig) -> list[str]:
    """The teacher's sampled continuation of each prompt (prompt included), decoded; a progress bar per batch."""
    import torch
    from tqdm.auto import tqdm

    device = next(teacher.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    was_training = teacher.training
    teacher.eval()
    # (a forked generator: the sampling has its own seed and leaves the training's random state as it was)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(config.seed)
            for start in tqdm(range(0, len(prompts), config.batch_size), desc="Teacher writing text", unit="batch"):
                batch = torch.tensor(prompts[start : start + config.batch_size], device=device)  # (all one length)
                out = teacher.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                       temperature=config.temperature, top_p=config.top_p, top_k=0,
                                       max_new_tokens=config.new_tokens, pad_token_id=pad)
                texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    finally:
        teacher.train(was_training)
    return texts


def read_text_file(path: Path, expected: str) -> list[str] | None:
    """The texts of a cache file written for `expected` (a fingerprint); None when it is absent or for other
    inputs."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > MAX_TEXT_FILE_BYTES:
        raise UserError(f"{path}: {size:,} bytes, more than a teacher-text file holds ({MAX_TEXT_FILE_BYTES:,})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a teacher-text file ({err}); remove it to generate again") from None
    # (only a file this project wrote, with its fingerprint, is ever replaced)
    if not isinstance(record, dict) or "fingerprint" not in record or not isinstance(record.get("texts"), list):
        raise UserError(f"{path}: not a teacher-text file (no fingerprint and texts); remove it to generate again")
    if record.get("fingerprint") != expected:
        return None
    return [str(text) for text in record["texts"]]


def with_teacher_text(train, teacher, tokenizer, config: GeneratedTextConfig, data, folder: Path):
    """The raw training rows (text column) followed by the teacher's texts, or those alone with `config.only`. The
    main process generates (or reuses) the file; the others wait for it and read it."""
    import datasets

    from ..distributed import is_main_process, wait_for_everyone

    path = data.resolve(config.file) if config.file else Path(folder) / TEXT_FILE
    texts = teacher_text(teacher, tokenizer, list(train[data.text_column]), config, path) if is_main_process() \
        else None
    wait_for_everyone()
    if texts is None:
        texts = teacher_text(teacher, tokenizer, list(train[data.text_column]), config, path)  # (reads the file)
    written = datasets.Dataset.from_dict({data.text_column: texts})
    if config.only:
        return written
    return datasets.concatenate_datasets([train.select_columns([data.text_column]), written])


def teacher_text(teacher, tokenizer, texts: list[str], config: GeneratedTextConfig, path: Path) -> list[str]:
    """The teacher's texts for the prompts cut from `texts`: read from `path` when it was written for this teacher,
    these prompts and settings; else generated and written there (atomically: a killed run leaves no half file)."""
    prompts = teacher_prompts(texts, tokenizer, config)
    expected = fingerprint(teacher, prompts, config)
    cached = read_text_file(path, expected)
    if cached is not None:
        logger.info("distill: %d teacher-written texts reused from %s", len(cached), path)
        return cached
    generated = generate_teacher_text(teacher, tokenizer, prompts, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps({"fingerprint": expected, "settings": config.model_dump(), "texts": generated}),
                       encoding="utf-8")
    os.replace(partial, path)
    logger.info("distill: the teacher wrote %d texts of %d new tokens into %s", len(generated), config.new_tokens,
                path)
    return generated
