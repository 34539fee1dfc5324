"""`MinitronConfig`: the target shape (or parameter budget) of Minitron-style width and depth pruning."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The config keys of a decoder's shape that Minitron pruning sets; every layer gets the same value.
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


class MinitronConfig(BaseModel):
    """Prune a decoder LLM to a smaller uniform shape, ranking layers, heads, FFN neurons and embedding channels by
    their activations on calibration batches (forward passes only; Muralidharan et al. 2024,
    https://arxiv.org/abs/2407.14679). Each shape field left unset keeps the model's value; with `target_params`,
    the fields that are set are held fixed and the search chooses the others (e.g. `num_hidden_layers`, which sets
    the decoding speed more than the parameter count does)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    num_hidden_layers: int | None = Field(None, ge=1, description="Blocks kept (depth); the others are removed.")
    hidden_size: int | None = Field(None, ge=1, description="Embedding channels kept (the residual stream width).")
    intermediate_size: int | None = Field(None, ge=1, description="FFN neurons kept in every block.")
    num_attention_heads: int | None = Field(None, ge=1, description="Query heads kept in every block.")
    num_key_value_heads: int | None = Field(
        None, ge=1, description="Key/value heads (GQA groups) kept in every block; whole groups go, with their "
        "query heads. Default: unchanged, unless the model has one key/value head per query head (then it "
        "follows num_attention_heads).",
    )
    target_params: int | None = Field(
        None, gt=0, description="A parameter budget instead of a shape: the grid of candidate shapes within it is "
        "searched and the one with the lowest calibration LM loss right after pruning is taken. Shape fields set "
        "beside it are held fixed in every candidate.",
    )
    target_params_counted: Literal["total", "non_embedding"] = Field(
        "total", description="What target_params counts: every parameter (total), or all but the input "
        "embeddings and an untied LM head (non_embedding).",
    )
    search_candidates: int = Field(8, gt=0, description="The search prunes and scores this many of the largest "
                                   "grid shapes within the budget.")
    depth_importance: Literal["lm_loss", "block_influence"] = Field(
        "lm_loss", description="Which blocks go: those whose skipping raises the calibration LM loss least "
        "(lm_loss), or those changing their input least, 1 - cos(input, output) (block_influence, Men et al. "
        "2024). Both are measured and reported.",
    )
    calibration_batches: int = Field(32, gt=0, description="Calibration batches (input_ids / attention_mask "
                                     "dicts) used to score; the first this many are taken.")

    @model_validator(mode="after")
    def _shape_or_budget(self):
        if self.target_params is None and not self.target_shape():
            raise ValueError(f"set target_params, or at least one target shape field: {', '.join(SHAPE_KEYS)}")
        return self

    def target_shape(self) -> dict[str, int]:
        """The shape fields that are set."""
        return {key: getattr(self, key) for key in SHAPE_KEYS if getattr(self, key) is not None}
