"""Quantization with bitsandbytes: int8 (LLM.int8), NF4 and FP4 weights (`quantize`), a sensitivity scan that keeps
the layers that hurt most in full precision, and KD recovery with LoRA adapters; and the configs of group-wise
storage on disk (written by `hf_modelopt.formats`)."""

from .config import QuantizationConfig, RecoveryConfig, SensitivityConfig, StorageQuantizationConfig

__all__ = ["QuantizationConfig", "RecoveryConfig", "SensitivityConfig", "StorageQuantizationConfig", "quantize"]


def __getattr__(name):
    # `quantize` pulls in transformers and bitsandbytes: load it on first use only.
    if name == "quantize":
        from .quantize import quantize

        return quantize
    raise AttributeError(name)
