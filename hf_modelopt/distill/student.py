"""Students built from their teacher by keeping some of its layers, weights copied (as DistilBERT was)."""

from __future__ import annotations

import copy
import re

import torch


def transformer_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The name and the ModuleList of the model's transformer blocks (BERT, DistilBERT, GPT-2, Llama, ...)."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and name:
            return name, module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {count} transformer layers found")


def select_layers(num_layers: int, layers: list[int] | None = None, every: int | None = None) -> list[int]:
    chosen = list(layers) if layers is not None else list(range(0, num_layers, every or 1))
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"student.layers {bad} out of range: the teacher has layers 0..{num_layers - 1}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"student.layers repeats a layer: {chosen}")
    return chosen


def student_from_teacher(teacher, layers: list[int] | None = None, every: int | None = None):
    """A model of the teacher's class with only `layers` (or every `every`-th layer), weights copied.

    Embeddings, final norm and task head are copied as they are; student layer i is teacher layer
    `layers[i]`. Per-layer config lists (`layer_types`) are subset to match.
    """
    chosen = select_layers(teacher.config.num_hidden_layers, layers, every)
    prefix, _ = transformer_layers(teacher)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(chosen)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in chosen]
    student = type(teacher)(config).to(teacher.dtype)
    source = teacher.state_dict()
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    copied = {}
    for key in student.state_dict():
        match = pattern.match(key)
        copied[key] = source[f"{prefix}.{chosen[int(match[1])]}.{match[2]}" if match else key]
    student.load_state_dict(copied, strict=True)
    return student, chosen
