"""Quantization with bitsandbytes: int8 (LLM.int8), NF4 and FP4 weights, a sensitivity scan that keeps the
layers that hurt most in full precision, and KD recovery with LoRA adapters. The `quantize` stage registers
in `stage.py`."""
