"""A teacher too big for one device: its layers spread over GPUs, CPU RAM and disk for its forward passes.

This is accelerate's big-model inference (what `from_pretrained(device_map="auto")` does), applied to a
teacher already in memory: KD never trains the teacher, so it needs no optimizer state or gradients, and
layer-by-layer placement is all it takes. Each block runs where its weights are; accelerate's hooks move
the activations between devices, and the outputs come back on the device of the inputs.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..files import remove_inside

logger = logging.getLogger("hf_modelopt")


def _memory_keys(max_memory: dict | None) -> dict | None:
    """YAML may give GPU indices as strings ("0"); accelerate wants them as ints."""
    if max_memory is None:
        return None
    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in max_memory.items()}


def dispatch_teacher(teacher, device_map: str, max_memory: dict | None = None, offload_dir: str | Path | None = None):
    """Spread `teacher` over the devices by `device_map` ("auto", "balanced", "balanced_low_0", "sequential").

    Layers that do not fit within `max_memory` go to disk, in `offload_dir`, and are read back for each
    forward pass. The model is changed in place (and returned); its placement is in `teacher.hf_device_map`.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    # A decoder layer or a BERT block must stay whole on one device (residual connections cross it).
    no_split = list(getattr(teacher, "_no_split_modules", None) or [])
    requested = max_memory = _memory_keys(max_memory)
    if device_map != "sequential":  # "auto" is "balanced", as in from_pretrained
        max_memory = get_balanced_memory(teacher, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
    placement = infer_auto_device_map(teacher, max_memory=max_memory, no_split_module_classes=no_split)
    if set(placement.values()) == {"disk"}:
        size = sum(p.numel() * p.element_size() for p in teacher.parameters())
        raise UserError(f"teacher_max_memory {requested} holds none of the teacher's layers (the teacher takes "
                        f"{size / 2**20:.1f} MiB, and the device that runs offloaded layers keeps room for the "
                        "largest one): raise it")
    if "disk" in placement.values() and offload_dir is None:
        raise ValueError("the teacher does not fit in the given memory and no offload_dir was given for the rest")
    teacher.eval().requires_grad_(False)
    # force_hooks: even on one device, inputs are moved to the teacher's device and outputs moved back, so the
    # student may sit elsewhere.
    dispatch_model(teacher, device_map=placement, offload_dir=str(offload_dir) if offload_dir else None,
                   force_hooks=True)
    counts = Counter(str(device) for device in placement.values())
    logger.info("distill: teacher spread over %s", ", ".join(f"{device} ({n} modules)" for device, n in counts.items()))
    return teacher


@contextmanager
def placed_teacher(teacher, config, scratch_dir: str | Path):
    """Within the block, `teacher` is spread over the devices as `config.teacher_device_map` says.

    `config` is a `KnowledgeDistillationConfig`, or None to leave the teacher where it is. Layers offloaded
    to disk are written under `scratch_dir` and deleted when the block ends, whether it succeeds or not.
    """
    if config is None or config.teacher_device_map is None:
        yield teacher
        return
    offload_dir = Path(scratch_dir) / "teacher_offload"
    try:
        yield dispatch_teacher(teacher, config.teacher_device_map, config.teacher_max_memory, offload_dir)
    finally:
        if offload_dir.exists():
            remove_inside(offload_dir, scratch_dir)


def is_dispatched(model) -> bool:
    """Whether `model` was spread over devices by accelerate (it must then not be moved as a whole)."""
    return getattr(model, "hf_device_map", None) is not None
