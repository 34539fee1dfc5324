"""Which layers transformers' bitsandbytes integration replaces: the one rule that quantization plans with and
that the support check (`compat`) refuses by.

A foundation fact, not quantization code: it needs no bitsandbytes, and the support check must read it without
importing `hf_modelopt.quant` (which itself reads `compat`).
"""

from __future__ import annotations


def linear_layers(model) -> dict[str, tuple[int, int]]:
    """Every linear layer bitsandbytes would replace: module name -> (in_features, out_features).

    transformers replaces the modules whose type is exactly `nn.Linear`, and GPT-2's `Conv1D`; a subclass with
    its own forward (Falcon's `FalconLinear`) stays in full precision.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    layers = {}
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            layers[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2 style: weight is [in, out]
            layers[name] = tuple(module.weight.shape)
    return layers
