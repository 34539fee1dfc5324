"""`all_or_nothing(model)`: a verb that changes a model in place either finishes or leaves the model as it was.

Pruning works block by block and rebuilds modules as it goes (structured pruning replaces Linear layers and edits
the attention modules' head counts; expert removal replaces the fused expert parameters and the config's expert
count; Minitron removes blocks); the sensitivity scan of `quantize` swaps fake-quantized weights in and out. An
exception half-way (a crash in block 3, a KeyboardInterrupt, out of memory) would otherwise leave a model that is
partly changed and looks whole.

The rule chosen is snapshot-and-restore rather than "check everything, then change": the checks that can be made
first are made first (the support check, the configs, the kept counts), but a failure inside the work (a kernel, a
Cholesky factorisation, an interrupt) cannot be foreseen. Before the first change the guard records, for every
module, its attributes and the dicts of its submodules, parameters and buffers, a copy of every tensor's data, and
the config's attributes; on any exception it puts all of them back, then re-raises. It costs one copy of the
weights in memory while the verb runs (on the device they are on). Nested guards on the same model (`prune_`
calling `prune_oneshot_`) take one snapshot.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

# ids of the models a guard is active on: an inner guard of the same model records nothing more.
_GUARDED: set[int] = set()


class _Snapshot:
    def __init__(self, model):
        self.modules = [(module, dict(module.__dict__), dict(module._modules), dict(module._parameters),
                         dict(module._buffers)) for module in model.modules()]
        self.tensors = []
        seen = set()
        for _, _, _, parameters, buffers in self.modules:
            for tensor in (*parameters.values(), *buffers.values()):
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    self.tensors.append((tensor, tensor.detach().clone()))
        config = getattr(model, "config", None)
        self.config = (config, copy.deepcopy(config.__dict__)) if config is not None else None

    @torch.no_grad()
    def restore(self) -> None:
        for module, attributes, modules, parameters, buffers in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            # The three dicts are the same objects as before, changed in place: give back their old contents.
            module.__dict__["_modules"], module.__dict__["_parameters"], module.__dict__["_buffers"] = (
                modules, parameters, buffers)
        for tensor, saved in self.tensors:
            if tensor.shape == saved.shape and tensor.dtype == saved.dtype:
                tensor.copy_(saved)  # the same storage: optimizers and views holding it stay valid
            else:
                tensor.data = saved
        if self.config is not None:
            config, attributes = self.config
            config.__dict__.clear()
            config.__dict__.update(attributes)


@contextmanager
def all_or_nothing(model):
    """Run the block; if it raises, restore `model` (modules, tensors, config) to what it was, and re-raise.

    Example:
        with all_or_nothing(model):
            prune_block_by_block(model)
    """
    if id(model) in _GUARDED or not isinstance(model, torch.nn.Module):
        # (not a model: nothing to restore, and the verb's own checks say what is wrong with it)
        yield
        return
    snapshot = _Snapshot(model)
    _GUARDED.add(id(model))
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise
    finally:
        _GUARDED.discard(id(model))


def changes_in_place(verb):
    """Decorator of a verb whose first argument is the model it changes in place: `all_or_nothing` around it."""
    import functools

    @functools.wraps(verb)
    def guarded(model, *args, **kwargs):
        with all_or_nothing(model):
            return verb(model, *args, **kwargs)

    return guarded
