"""Module surgery that formats and techniques share: which modules are Linear, and rebuilding one at a shape."""

from __future__ import annotations

import torch


def is_linear(module) -> bool:
    """`nn.Linear`, or the `Conv1D` GPT-2 uses in its place (same matmul, weight stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def resize_linear_(model, name: str, out_features: int, in_features: int) -> None:
    """Replace Linear `name` by an uninitialised one of the given shape (before weights are loaded)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    new = torch.nn.Linear(in_features, out_features, bias=old.bias is not None, device=old.weight.device,
                          dtype=old.weight.dtype)
    setattr(parent, child, new)
