"""Students built from their teacher by keeping some of its layers, weights copied (as DistilBERT was).

The transformer blocks of any model are found by `hf_modelopt.blocks` (`layer_stacks`, `transformer_layers`,
imported here for the code that reads them from this module).
"""

from __future__ import annotations

import copy
import re

from ..blocks import (  # noqa: F401  (re-exported: the techniques import them from here)
    COUNT_KEYS,
    DECODER_COUNT_KEYS,
    ENCODER_COUNT_KEYS,
    LayerStack,
    layer_stacks,
    transformer_layers,
)


def select_layers(num_layers: int, layers: list[int] | None = None, every: int | None = None,
                  key: str = "student.layers") -> list[int]:
    chosen = list(layers) if layers is not None else list(range(0, num_layers, every or 1))
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{key} {bad} out of range: the teacher has layers 0..{num_layers - 1}")
    if not chosen:
        raise ValueError(f"{key} is empty: keep at least one of the teacher's {num_layers} layers")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{key} repeats a layer: {chosen}")
    return chosen


def student_from_teacher(teacher, layers: list[int] | None = None, every: int | None = None,
                         decoder_layers: list[int] | None = None):
    """A model of the teacher's class with only `layers` (or every `every`-th layer), weights copied.

    Embeddings, final norm and task head are copied as they are; student layer i is teacher layer
    `layers[i]`. Per-layer config lists (`layer_types`) are subset to match. For an encoder-decoder (T5,
    BART), `layers` / `every` choose the encoder's layers and `decoder_layers` the decoder's (default: the
    same rule as the encoder). A weight only the teacher's first block holds (T5's relative attention bias)
    is copied from that block into the student's first block, whichever teacher layer it keeps.

    Returns the student and the teacher layers of its first stack (the encoder's for an encoder-decoder).
    """
    from ..compat import require_support  # at call time: compat reads this module's layer_stacks

    require_support("students from teacher layers", teacher)
    stacks = layer_stacks(teacher)
    chosen: dict[str, list[int]] = {}
    for stack in stacks:
        if stack.is_decoder and decoder_layers is not None:
            chosen[stack.path] = select_layers(len(stack.layers), decoder_layers, None, "student.decoder_layers")
        else:
            key = ("student.layers (also applied to the decoder unless decoder_layers is given)"
                   if stack.is_decoder and layers is not None else "student.layers")
            chosen[stack.path] = select_layers(len(stack.layers), layers, every, key)
    config = copy.deepcopy(teacher.config)
    counted_once = {id(stack.config_of(teacher.config)) for stack in stacks}
    for stack in stacks:
        stack_config = stack.config_of(config)
        kept = chosen[stack.path]
        setattr(stack_config, stack.count_key, len(kept))
        per_layer = getattr(stack_config, "layer_types", None)
        # (layer_types belongs to the one stack its config counts; with two stacks on one config, it is ambiguous)
        if isinstance(per_layer, list) and len(per_layer) == len(stack.layers) and len(counted_once) == len(stacks):
            stack_config.layer_types = [per_layer[i] for i in kept]
    student = type(teacher)(config).to(teacher.dtype)
    source = teacher.state_dict()
    patterns = [(re.compile(rf"^{re.escape(s.path)}\.(\d+)\.(.*)$"), s.path) for s in stacks]
    copied = {}
    for key in student.state_dict():
        copied[key] = source[_teacher_key(key, patterns, chosen, source)]
    student.load_state_dict(copied, strict=True)
    return student, chosen[stacks[0].path]


def _teacher_key(key: str, patterns, chosen: dict[str, list[int]], source: dict) -> str:
    for pattern, path in patterns:
        match = pattern.match(key)
        if match is None:
            continue
        teacher_key = f"{path}.{chosen[path][int(match[1])]}.{match[2]}"
        if teacher_key not in source and f"{path}.0.{match[2]}" in source:
            # Only block 0 holds it (T5's relative_attention_bias, shared by the whole stack): the student's
            # first block is built with it, whichever teacher block it copies.
            return f"{path}.0.{match[2]}"
        return teacher_key
    return key
