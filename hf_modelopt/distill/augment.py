"""Perturbed copies of the labelled training sentences, for KD only (Tang et al. 2019, "Distilling
Task-Specific Knowledge from BERT into Simple Neural Networks").

A student trained on a few thousand labelled sentences sees each of them many times and fits them; the
teacher's soft targets on perturbed copies (short n-grams, masked words) give it new inputs from the same
domain without new labels. The copies carry label -100: they train the KD terms, never the task loss.
Measured on `recipes/sst2-minilm/gmp-90.yaml` (README, Pruning), 4 copies per sentence did not help the 90 %
sparse student, so that recipe does not use it.
"""

from __future__ import annotations

import random

from pydantic import BaseModel, ConfigDict, Field


class AugmentationConfig(BaseModel):
    """How many perturbed copies of each labelled sentence to add, and how each copy is perturbed.

    Each copy is, with `ngram_probability`, a random run of 1 to `max_ngram` consecutive words of the
    sentence, else the whole sentence; then each of its words is, with `mask_probability`, replaced by the
    tokenizer's mask token (dropped where the tokenizer has none).
    """

    model_config = ConfigDict(extra="forbid")
    copies: int = Field(gt=0, description="Perturbed copies per labelled training sentence.")
    ngram_probability: float = Field(0.25, ge=0, le=1, description="Chance that a copy is a short n-gram.")
    max_ngram: int = Field(5, gt=0, description="Longest n-gram, in words.")
    mask_probability: float = Field(0.1, ge=0, le=1, description="Chance that each word of a copy is masked.")
    seed: int = Field(0, description="Seed of the perturbations: every process builds the same copies.")


def augmented_sentences(sentences: list[str], config: AugmentationConfig, mask_token: str | None) -> list[str]:
    """`config.copies` perturbed copies of each sentence (whitespace-separated words), deduplicated.

    Copies identical to a training sentence or to an earlier copy are dropped: they would only weigh those
    inputs more.
    """
    rng = random.Random(config.seed)
    seen = set(sentences)
    copies = []
    for sentence in sentences:
        words = sentence.split()
        if not words:
            continue
        for _ in range(config.copies):
            copy = _perturbed(words, config, mask_token, rng)
            if copy and copy not in seen:
                seen.add(copy)
                copies.append(copy)
    return copies


def _perturbed(words: list[str], config: AugmentationConfig, mask_token: str | None, rng: random.Random) -> str:
    if rng.random() < config.ngram_probability:
        length = rng.randint(1, min(config.max_ngram, len(words)))
        start = rng.randint(0, len(words) - length)
        words = words[start:start + length]
    kept = []
    for word in words:
        if rng.random() >= config.mask_probability:
            kept.append(word)
        elif mask_token is not None:
            kept.append(mask_token)
    return " ".join(kept)
