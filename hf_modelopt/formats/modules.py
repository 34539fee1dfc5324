"""Module surgery that formats and techniques share: which modules are Linear, rebuilding one at a shape, the head
counts attention modules cache, and the one measure of sparsity (`zero_fraction`)."""

from __future__ import annotations

import torch


def zero_fraction(*tensors) -> float:
    """Fraction of exactly-zero values over `tensors` (0.0 when they hold none): sparsity as measured, the one
    count the formats (whether a bitmask pays), pruning (reports) and the export's figures share."""
    zeros = total = 0
    for tensor in tensors:
        zeros += int((tensor.detach() == 0).sum())
        total += tensor.numel()
    return zeros / total if total else 0.0


def is_linear(module) -> bool:
    """`nn.Linear`, or the `Conv1D` GPT-2 uses in its place (same matmul, weight stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def new_linear_like(old, out_features: int, in_features: int, bias: bool):
    """An uninitialised layer of `old`'s class (Linear or GPT-2's Conv1D) and dtype/device, at a new shape."""
    from transformers.pytorch_utils import Conv1D

    device, dtype = old.weight.device, old.weight.dtype
    if isinstance(old, Conv1D):
        new = Conv1D(out_features, in_features).to(device=device, dtype=dtype)
        if not bias:
            new.bias = None
        return new
    return torch.nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)


def resize_linear_(model, name: str, out_features: int, in_features: int) -> None:
    """Replace Linear (or Conv1D, or Embedding) `name` by an uninitialised one of the given shape [out, in]
    (an Embedding's weight shape), before the weights are loaded."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    if isinstance(old, torch.nn.Embedding):  # (T5's relative attention bias: buckets x heads)
        new = torch.nn.Embedding(out_features, in_features, device=old.weight.device, dtype=old.weight.dtype)
    else:
        new = new_linear_like(old, out_features, in_features, old.bias is not None)
    setattr(parent, child, new)


# Attributes attention modules compute once from the config and use in forward (a `view` with the head count,
# a `split` at the q/k/v width): after heads are removed, or when a pruned model is rebuilt, they must be set.
_HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads")
_WIDTH_ATTRIBUTES = ("all_head_size", "split_size", "inner_dim")  # (BERT-like, GPT-2, T5): heads x head size


def set_attention_heads_(attention, heads: int, kv_heads: int, head_dim: int) -> None:
    """Make an attention module's cached head counts match its (pruned) projections."""
    for name in _HEAD_COUNT_ATTRIBUTES:
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, heads)
    for name in _WIDTH_ATTRIBUTES:
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, heads * head_dim)
    if isinstance(getattr(attention, "num_key_value_groups", None), int):
        attention.num_key_value_groups = heads // kv_heads
