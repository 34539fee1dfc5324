"""Configs of knowledge distillation: the loss (`DistillationConfig`, what `DistillationTrainer` takes), how the
teacher runs and what extra data it sees (`KnowledgeDistillationConfig`, what recipes' `distillation:` keys
take), and where a student comes from (`StudentConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .augment import AugmentationConfig
from .generate import GeneratedTextConfig


class StudentConfig(BaseModel):
    """Where the student comes from: layers kept from the teacher, or a model of its own."""

    model_config = ConfigDict(extra="forbid")
    layers: list[int] | None = Field(
        None, description="Teacher layers the student keeps, in order (e.g. [0, 2, 4]); weights are copied."
    )
    every: int | None = Field(None, gt=0, description="Keep every n-th teacher layer, from layer 0.")
    name_or_path: str | None = Field(None, description="A separate student model (Hub id or folder).")
    decoder_layers: list[int] | None = Field(
        None, description="Encoder-decoders (T5, BART): teacher decoder layers the student keeps, in order; "
        "`layers` / `every` then choose the encoder's (alone: the whole encoder is kept). Default: the decoder "
        "follows the encoder's rule.",
    )

    @model_validator(mode="after")
    def _one_source(self):
        given = [key for key in ("layers", "every", "name_or_path") if getattr(self, key) is not None]
        if len(given) != 1 and not (not given and self.decoder_layers is not None):
            raise ValueError(f"set exactly one of layers, every, name_or_path (got {given or 'none'})")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers}")
        if self.decoder_layers is not None and self.name_or_path is not None:
            raise ValueError("decoder_layers chooses teacher layers to keep; a separate student (name_or_path) has "
                             "its own: remove decoder_layers")
        if self.decoder_layers is not None and (not self.decoder_layers or min(self.decoder_layers) < 0):
            raise ValueError(f"decoder_layers must be a non-empty list of layer indices >= 0, "
                             f"got {self.decoder_layers}")
        return self


class DistillationConfig(BaseModel):
    """The distillation loss: what `DistillationTrainer(distillation=...)` is told.

    The loss is a weighted sum: `kd_weight`·soft-target KL at `temperature` (× T²) + `ce_weight`·task
    cross-entropy + `hidden_weight`·hidden-state MSE + `cosine_weight`·hidden-state cosine +
    `attention_weight`·attention-map KL or MSE. Terms with weight 0 are not computed.

    Example:
        DistillationConfig(temperature=2.0, kd_weight=1.0, ce_weight=0.5)
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the soft-target KL.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the soft-target KL (Hinton).")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the hard-label cross-entropy.")
    hidden_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state MSE (TinyBERT).")
    cosine_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state cosine loss (DistilBERT).")
    attention_weight: float = Field(0.0, ge=0, description="Weight of the attention-map loss (MiniLM / TinyBERT).")
    attention_loss: Literal["kl", "mse"] = Field("kl", description="Attention-map loss: KL (MiniLM) or MSE.")
    layer_map: dict[int, int] | None = Field(
        None, description="Student layer -> teacher layer for hidden / attention losses. Default: a kept layer "
        "maps to the last teacher layer it stands in for (layers [0, 2, 4] of 6 -> {0: 1, 1: 3, 2: 5}), "
        "else evenly spaced teacher layers, last to last.",
    )
    top_k: int | None = Field(
        None, gt=0, description="Keep only the teacher's k largest logits per position (live and cached KD alike).",
    )

    @property
    def needs_hidden_states(self) -> bool:
        return bool(self.hidden_weight or self.cosine_weight or self.attention_weight)

    @model_validator(mode="after")
    def _some_loss(self):
        weights = (self.kd_weight, self.ce_weight, self.hidden_weight, self.cosine_weight, self.attention_weight)
        if not any(weights):
            raise ValueError("all loss weights are 0: set kd_weight, ce_weight, hidden_weight, ... above 0")
        return self


class KnowledgeDistillationConfig(DistillationConfig):
    """The loss, plus how the teacher runs and which extra text it sees: what recipes' `distillation:` keys
    take (the `distill` stage, and `prune` / `prune_structured` with KD)."""

    cache_teacher_logits: bool = Field(
        False, description="Compute the teacher's (top-k) logits over the training set once, store them as "
        "safetensors in the stage folder, and train from them instead of running the teacher.",
    )
    transfer_file: str | None = Field(
        None, description="Unlabelled text (relative to data.data_dir, one example per line) added to the "
        "training set for KD only (classification).",
    )
    max_transfer_samples: int | None = Field(None, gt=0, description="Use only the first N transfer lines.")
    augmentation: AugmentationConfig | None = Field(
        None, description="Perturbed copies of the labelled training sentences (n-grams, masked words) added "
        "to the training set for KD only (classification; Tang et al. 2019).",
    )
    generated_text: GeneratedTextConfig | None = Field(
        None, description="Causal LM: also (or only) train on text the teacher writes itself, continuing prompts cut "
        "from the training text; written once to a file and reused (samples, prompt_tokens, new_tokens, "
        "temperature, top_p, seed, only, file).",
    )
    teacher_device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = Field(
        None, description="For a teacher too big for one device: spread its layers over the GPUs, then CPU RAM, "
        "then disk (accelerate big-model inference; `from_pretrained(device_map=...)` strategies). One process, "
        "or several with cache_teacher_logits (the main process alone runs the teacher).",
    )
    teacher_max_memory: dict[int | str, int | str] | None = Field(
        None, description="With teacher_device_map: memory the teacher may take per device, e.g. "
        "{0: 20GiB, 1: 20GiB, cpu: 64GiB}; what does not fit is offloaded to disk. Default: what is free.",
    )

    def loss(self) -> DistillationConfig:
        """The loss part alone, for `DistillationTrainer`."""
        return DistillationConfig(**{name: getattr(self, name) for name in DistillationConfig.model_fields})

    @model_validator(mode="after")
    def _teacher_settings(self):
        if self.cache_teacher_logits and (self.hidden_weight or self.cosine_weight or self.attention_weight):
            raise ValueError("cache_teacher_logits caches logits only: hidden / cosine / attention losses need "
                             "the live teacher (set their weights to 0 or turn the cache off)")
        if self.teacher_max_memory is not None and self.teacher_device_map is None:
            raise ValueError("teacher_max_memory is read only with teacher_device_map: set that too")
        return self
