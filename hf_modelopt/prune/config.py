"""Configs of the pruning techniques: gradual unstructured (`PruningConfig`, for `PruningCallback`), structured
heads / neurons (`StructuredPruningConfig`) and one-shot from calibration data (`OneShotPruningConfig`); the
last two, and a `PruningConfig` at once, for `prune_`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Modules pruned by default: every Linear inside the transformer blocks. Embeddings, norms and the task
# head are never targets: they are small, or (embeddings) pruning them costs much quality for little speed.
DEFAULT_TARGETS = ("*",)


class ScheduleConfig(BaseModel):
    """When the target sparsity moves: all at once, or gradually between two optimizer steps."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["one_shot", "linear", "cubic"] = Field(
        "cubic", description="one_shot: the final sparsity at start_step. linear / cubic: rise from "
        "initial_sparsity at start_step to the final sparsity at end_step (cubic: Zhu & Gupta 2017).",
    )
    initial_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="Sparsity at start_step (gradual kinds).")
    start_step: int = Field(0, ge=0, description="Optimizer step at which pruning starts.")
    end_step: int | None = Field(
        None, gt=0, description="Optimizer step at which the final sparsity is reached (gradual kinds). Default: "
        "two thirds of the training steps, so the last third recovers at the final sparsity.",
    )
    update_every: int = Field(10, gt=0, description="Recompute the masks every this many optimizer steps.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be after start_step ({self.start_step})")
        return self


class PruningConfig(BaseModel):
    """Gradual unstructured pruning of Linear weights during training (see `PruningCallback`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    sparsity: float = Field(description="Final fraction of the targeted weights set to zero, in [0, 1).", ge=0.0,
                            lt=1.0)
    method: Literal["magnitude", "movement"] = Field(
        "magnitude", description="Which weights go: smallest |W| (magnitude), or those moving towards zero "
        "during fine-tuning, score -Σ W·∂L/∂W (movement pruning, Sanh et al. 2020).",
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: every targeted matrix reaches the sparsity. global: one threshold over "
        "all targeted weights, so layers end with different sparsities.",
    )
    targets: list[str] = Field(
        list(DEFAULT_TARGETS), description="Glob patterns over Linear module names inside the transformer "
        "blocks, relative to the block list (e.g. '*.attention.*', '*.mlp.*'). Default: every Linear there.",
    )
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of module names never pruned.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="When the sparsity rises.")


class StructuredPruningConfig(BaseModel):
    """Remove attention heads and FFN neurons: every layer keeps the same number of heads and of neurons, chosen
    by importance; the Linear layers are rebuilt smaller (see `hf_modelopt.prune.structured`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    heads: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of attention heads removed in every layer.")
    neurons: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of FFN neurons removed in every layer.")
    importance: Literal["magnitude", "gradient"] = Field(
        "gradient", description="gradient: E|∂L/∂gate| of a gate on each head / neuron over calibration batches "
        "(Michel et al. 2019); magnitude: squared norms of their weights.",
    )
    calibration_batches: int = Field(32, gt=0, description="Training batches used to score heads and neurons.")

    @model_validator(mode="after")
    def _removes_something(self):
        if not self.heads and not self.neurons:
            raise ValueError("set heads and/or neurons above 0 (the fractions to remove)")
        return self


class OneShotPruningConfig(BaseModel):
    """Prune a causal LM once from calibration data, no training (Wanda, SparseGPT, or magnitude)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    method: Literal["wanda", "sparsegpt", "magnitude"] = Field(
        "wanda", description="wanda: |W|·||X|| per output row (Sun et al. 2023); sparsegpt: second-order with "
        "weight updates (Frantar & Alistarh 2023); magnitude: |W| per matrix, the baseline.",
    )
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="Fraction of the targeted weights zeroed "
                            "(unstructured; an N:M pattern fixes it at N/M).")
    pattern: str = Field("unstructured", pattern=r"^(unstructured|\d+:\d+)$",
                         description="'unstructured' or 'N:M' (N of every M consecutive weights zeroed, e.g. '2:4').")
    calibration_samples: int = Field(64, gt=0, description="Calibration sequences of data.max_length tokens, "
                                     "from the training split.")
    targets: list[str] = Field(list(DEFAULT_TARGETS), description="Glob patterns over Linear names in the blocks.")
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of module names never pruned.")
    block_size: int = Field(128, gt=0, description="SparseGPT: columns processed together.")
    dampening: float = Field(0.01, gt=0, description="SparseGPT: fraction of the mean Hessian diagonal added.")

    @model_validator(mode="after")
    def _valid_pattern(self):
        if self.pattern != "unstructured":
            n, m = (int(x) for x in self.pattern.split(":"))
            if not 0 < n < m:
                raise ValueError(f"pattern {self.pattern!r}: N:M needs 0 < N < M")
            self.__dict__["sparsity"] = n / m
        return self


class ExpertRemovalConfig(BaseModel):
    """Remove whole experts of mixture-of-experts blocks, scored on calibration data by routing frequency x mean
    output norm (REAP); every block keeps the same number (see `hf_modelopt.prune.experts`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    experts: int = Field(gt=0, description="Routed experts kept in every MoE block: at least the experts chosen per "
                         "token, fewer than there are.")
    calibration_batches: int = Field(32, gt=0, description="Calibration batches (model inputs) the experts are "
                                     "scored on.")
