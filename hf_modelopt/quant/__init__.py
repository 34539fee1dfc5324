"""Quantization with bitsandbytes (int8, NF4, FP4). Not implemented yet: its `quantize` stage registers
here."""
