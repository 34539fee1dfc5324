"""Configs of quantization: bitsandbytes (`QuantizationConfig`, for `quantize`, mapped onto `BitsAndBytesConfig`)
with its sensitivity scan and KD recovery, and group-wise storage on disk (`StorageQuantizationConfig`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SensitivityConfig(BaseModel):
    """Which layers stay in full precision: quantize one unit at a time and keep the ones that hurt most."""

    model_config = ConfigDict(extra="forbid")
    granularity: Literal["block", "layer"] = Field(
        "block", description="Unit scanned and kept: a whole transformer block, or a single linear layer.",
    )
    max_size_mb: float | None = Field(
        None, gt=0, description="Keep the most sensitive units in full precision while the estimated model size "
        "stays within this many MB (1 MB = 10^6 bytes).",
    )
    keep_fraction: float | None = Field(
        None, ge=0, lt=1, description="Keep this fraction of the units (the most sensitive) in full precision.",
    )
    calibration_samples: int = Field(
        16, gt=0, description="Training examples (classification) or `data.max_length`-token blocks (causal LM) "
        "the scan measures on; they come from the training split, never the evaluation data.",
    )
    batch_size: int = Field(4, gt=0, description="Batch size of the scan's forward passes.")

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.max_size_mb is None) == (self.keep_fraction is None):
            raise ValueError("set exactly one of max_size_mb, keep_fraction")
        return self


class RecoveryConfig(BaseModel):
    """Knowledge-distillation recovery (QLoRA-style): LoRA adapters on the frozen quantized model, trained to
    reproduce the full-precision model's logits. Needs 4-bit quantization and `peft`."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(16, gt=0, description="LoRA rank r.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input during training.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: 'all-linear' (every linear layer but the output "
        "head) or a list of module name suffixes (e.g. [q_proj, v_proj]).",
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the soft-target KL.")
    kd_weight: float = Field(1.0, ge=0, description="Weight of the soft-target KL to the full-precision logits.")
    ce_weight: float = Field(0.0, ge=0, description="Weight of the task cross-entropy on the labels.")
    training: dict[str, Any] = Field(
        default_factory=dict, description="TrainingArguments for the adapter training, over the recipe's `training:`.",
    )

    @model_validator(mode="after")
    def _some_loss(self):
        if not (self.kd_weight or self.ce_weight):
            raise ValueError("kd_weight and ce_weight are both 0: set one above 0")
        return self


class QuantizationConfig(BaseModel):
    """Quantize the incoming model's linear layers with bitsandbytes: LLM.int8 (`int8`) or 4-bit NF4 / FP4.

    Embeddings, the output head and the layers whose shapes bitsandbytes' CPU kernels reject stay in full
    precision (listed in the log, `quantization.json` and the model card).

    Example:
        QuantizationConfig(method="nf4", sensitivity=SensitivityConfig(keep_fraction=0.25))
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    method: Literal["int8", "nf4", "fp4"] = Field("nf4", description="int8 (LLM.int8), nf4 or fp4 (4-bit).")
    double_quant: bool = Field(
        False, description="4-bit: quantize the per-block scales too (saves ~0.4 bit per weight).",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="4-bit: dtype the matrix multiplications run in.",
    )
    skip_modules: list[str] = Field(
        default_factory=list, description="Modules kept in full precision besides the automatic ones: full names, "
        "name suffixes (`classifier`) or regular expressions (`model.layers.0.*`), as transformers matches them.",
    )
    int8_threshold: float = Field(
        6.0, ge=0, description="int8: activations above this magnitude take the full-precision path (LLM.int8).",
    )
    sensitivity: SensitivityConfig | None = Field(
        None, description="Scan layer sensitivity on calibration data and keep the most sensitive in full precision.",
    )
    recovery: RecoveryConfig | None = Field(
        None, description="Train LoRA adapters on the quantized model against the full-precision model's logits.",
    )

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    @model_validator(mode="after")
    def _four_bit_options(self):
        if self.method == "int8" and self.double_quant:
            raise ValueError("double_quant is a 4-bit option; use method nf4 or fp4, or drop double_quant")
        if self.method == "int8" and self.recovery is not None:
            raise ValueError("recovery trains adapters on 4-bit models only; use method nf4 or fp4")
        return self

    def to_bnb_config(self, skip_modules: list[str] | None = None):
        """The `transformers.BitsAndBytesConfig` of this config; `skip_modules` replaces `self.skip_modules`."""
        import torch
        from transformers import BitsAndBytesConfig

        skip = list(self.skip_modules if skip_modules is None else skip_modules)
        if self.method == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=self.int8_threshold,
                                      llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.method,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            llm_int8_skip_modules=skip,  # transformers' name for the skip list, for 4-bit too
        )


class StorageQuantizationConfig(BaseModel):
    """Store the weights in 8 or 4 bits on disk, group-wise, in compressed-tensors
    (`formats/compressed_tensors.py`) or hf-modelopt's format (`formats/groupwise.py`); they load back as a
    full-precision model. The download shrinks while speed and run-time memory stay
    those of full precision: the fast choice on CPU, where bitsandbytes kernels are slower than fp32.

    `hf_modelopt.save_compressed(model, folder, storage=StorageQuantizationConfig())` writes it.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    format: Literal["compressed-tensors", "hf_modelopt"] = Field(
        "compressed-tensors", description="compressed-tensors: the standard format, int8 / int4 Linear weights "
        "(symmetric, per group), loaded by plain transformers with the compressed-tensors package; embeddings "
        "and sparse weights stay as they are (dense). hf_modelopt: int8 / NF4 codes for Linear and embedding "
        "weights, with a bitmask for sparse ones (the smallest form), loaded after `import hf_modelopt`. Where "
        "compressed-tensors cannot hold a model (GPT-2's Conv1D layers, structurally pruned shapes), hf_modelopt "
        "is used and the log says why.",
    )
    linear_bits: Literal[4, 8] | None = Field(8, description="Bits per Linear weight (8: int8; 4: int4 in "
                                              "compressed-tensors, NF4 in hf_modelopt); null keeps them in full "
                                              "precision.")
    embedding_bits: Literal[4, 8] | None = Field(8, description="Bits per embedding weight (the vocabulary matrix "
                                                 "is most of a small model's size), hf_modelopt format only; null "
                                                 "keeps them.")
    group_size: int = Field(64, gt=0, description="Consecutive values sharing one fp16 scale (16 bits per group).")
    skip_modules: list[str] = Field(
        default_factory=lambda: ["classifier", "score"],
        description="Modules stored in full precision: full names or name suffixes. The default keeps "
        "classification heads, a few thousand weights whose rounding would move every prediction.",
    )

    @model_validator(mode="after")
    def _something_to_store(self):
        if self.linear_bits is None and self.embedding_bits is None:
            raise ValueError("linear_bits and embedding_bits are both null: nothing to quantize")
        return self
