"""Which weights are pruned: target selection and masks from scores. Masks are `True` where a weight stays."""

from __future__ import annotations

import math
from fnmatch import fnmatch

import torch

from ..blocks import layer_stacks, transformer_layers
from ..distributed import is_sharded, is_zero3_partitioned
from ..formats.experts import ExpertSlice, expert_matrices, experts_modules, router_names
from ..formats.modules import is_linear, zero_fraction


def full_weight(module) -> torch.Tensor:
    """The whole weight, gathered from every process if it is sharded (scores must see all of it).

    Gathering is a collective: every process calls this for the same modules in the same order.
    """
    weight = module.weight
    if is_sharded(weight):
        return weight.full_tensor()
    if is_zero3_partitioned(weight):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight


def weight_numel(module) -> int:
    """Number of elements of the whole weight (a ZeRO-3 parameter's own `numel()` is 0 between forwards)."""
    weight = module.weight
    return weight.ds_numel if is_zero3_partitioned(weight) else weight.numel()


def linear_weight(module) -> torch.Tensor:
    """The weight as (out_features, in_features), a view for `Conv1D` (which stores it transposed) and for an
    expert's matrix of a fused MoE parameter."""
    if isinstance(module, ExpertSlice):
        return module.out_in()
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()


def weight_grad(module) -> torch.Tensor | None:
    """The gradient of `module.weight` (an expert's part of the fused parameter's gradient)."""
    return module.weight_grad if isinstance(module, ExpertSlice) else module.weight.grad


def prunable_linears(model, targets=("*",), exclude=()) -> dict[str, torch.nn.Module]:
    """The prunable matrices inside the transformer blocks whose name (relative to the block list, e.g.
    `0.attention.self.query`) matches a `targets` glob and no `exclude` glob; keys are full module names.
    An encoder-decoder's encoder and decoder blocks are both selected (the globs apply to each stack).

    They are the Linear (and GPT-2 Conv1D) layers and, in mixture-of-experts blocks, every expert's matrix of the
    fused 3-D expert parameters as an `ExpertSlice` named `<experts module>.<parameter>.<expert>` (e.g.
    `0.mlp.experts.gate_up_proj.3`): each expert's matrix is pruned as its own matrix. The routers
    (`formats.experts.ROUTER_NAMES`) are never selected: a pruned router sends tokens to other experts.
    Embeddings, norms and the task head live outside the blocks, so they are never selected.
    """
    stacks = layer_stacks(model)
    if not stacks:
        transformer_layers(model)  # raises the "no layer stack" error
    found, candidates = {}, []
    for stack in stacks:
        routers = tuple(router_names(stack.layers))
        matrices = [(name, module) for name, module in stack.layers.named_modules() if is_linear(module)
                    and not any(name == r or name.startswith(r + ".") for r in routers)]
        for experts_name, experts in experts_modules(stack.layers).items():
            matrices += [(f"{experts_name}.{key}", part) for key, part in expert_matrices(experts).items()]
        for name, module in matrices:
            candidates.append(name)
            if any(fnmatch(name, p) for p in targets) and not any(fnmatch(name, p) for p in exclude):
                found[f"{stack.path}.{name}"] = module
    if not found:
        shown = ", ".join(candidates[:8]) + (", ..." if len(candidates) > 8 else "")
        raise ValueError(f"no Linear layer matches targets {list(targets)} (minus exclude {list(exclude)}); "
                         f"layer names look like: {shown}")
    return found


def block_parameters_report(model, modules: dict[str, torch.nn.Module]) -> dict:
    """What pruning covered, measured over every parameter of the transformer blocks (not only Linear layers):
    the targeted weights' count, all block parameters and their fraction of exact zeros, and the routers left
    dense. Under FSDP2 / ZeRO-3 the counts are of this process's parts."""
    parts, routers = [], []
    for stack in layer_stacks(model):
        for param in stack.layers.parameters():
            parts.append(param.to_local() if is_sharded(param) else param.ds_tensor if is_zero3_partitioned(param)
                         else param)
        routers += [f"{stack.path}.{name}" for name in router_names(stack.layers)]
    return {"targeted_parameters": sum(weight_numel(m) for m in modules.values()),
            "block_parameters": sum(part.numel() for part in parts), "block_sparsity": zero_fraction(*parts),
            "routers_kept_dense": routers}


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float, scope: str = "layer",
                      previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks that drop the `sparsity` fraction of lowest-scored weights, per tensor or globally.

    Weights already dropped in `previous` stay dropped (pruning only ever removes more), whatever their
    score now. The count dropped is exact: ⌈sparsity × number of weights⌉ (never below the target).
    """
    def ranked(name):
        score = scores[name].detach().float().flatten()
        if previous is not None and name in previous:
            score = score.masked_fill(~previous[name].flatten(), float("-inf"))
        return score

    masks = {}
    if scope == "layer":
        for name, score in scores.items():
            flat = ranked(name)
            masks[name] = _drop_lowest(flat, _count(sparsity, flat.numel())).view_as(score)
        return masks
    names = list(scores)
    flat = torch.cat([ranked(name) for name in names])
    keep = _drop_lowest(flat, _count(sparsity, flat.numel()))
    for name, part in zip(names, keep.split([scores[n].numel() for n in names])):
        masks[name] = part.view_as(scores[name])
    return masks


def _count(sparsity: float, numel: int) -> int:
    return min(numel, math.ceil(sparsity * numel - 1e-6))  # the tolerance keeps 0.5 × 10 at 5, not 6


def _drop_lowest(flat: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.ones_like(flat, dtype=torch.bool)
    if count > 0:
        keep[torch.topk(flat, count, largest=False, sorted=False).indices] = False
    return keep


@torch.no_grad()
def apply_masks_(modules: dict[str, torch.nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Zero the dropped weights in place.

    Masks are full-size; a sharded weight (FSDP2 DTensor) gets the mask sharded the same way, so each
    process zeroes its own shard (multiplying a shard by a full mask would silently do nothing useful); a
    ZeRO-3 weight gets its slice of the mask.
    """
    for name, mask in masks.items():
        weight = modules[name].weight
        if is_zero3_partitioned(weight):
            _apply_mask_to_zero3_partition_(weight, mask)
            continue
        if is_sharded(weight):
            from torch.distributed.tensor import distribute_tensor

            mask = distribute_tensor(mask.to(weight.device_mesh.device_type), weight.device_mesh, weight.placements)
        elif mask.device != weight.device:
            mask = masks[name] = mask.to(weight.device)
        weight.mul_(mask)


def _apply_mask_to_zero3_partition_(weight, mask: torch.Tensor) -> None:
    """DeepSpeed ZeRO-3: zero the dropped weights in this process's slice of `weight`, and in the optimizer's
    fp32 copy of that slice (copied back into the weight after every step, so it must be masked as well).

    Each process holds the elements [r·n, (r + 1)·n) of the flattened weight in `ds_tensor` (process r of
    the parameter's group, n elements each; the last slice is padded).
    """
    import torch.distributed as dist

    local = weight.ds_tensor
    start = dist.get_rank(group=weight.ds_process_group) * local.numel()
    keep = mask.flatten()[start : start + local.numel()].to(local.device, local.dtype)
    keep = torch.nn.functional.pad(keep, (0, local.numel() - keep.numel()), value=1.0).view_as(local)
    local.data.mul_(keep)
    if getattr(weight, "_z3_optimizer", None) is not None:  # set once DeepSpeed built the optimizer
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        master = safe_get_local_fp32_param(weight)
        if master is not None:
            safe_set_local_fp32_param(weight, master * keep.to(master.dtype).view_as(master))


def sparsity_of(modules: dict[str, torch.nn.Module]) -> float:
    """Fraction of exactly-zero weights over `modules` (what is measured, not what was asked)."""
    return zero_fraction(*(full_weight(m) for m in modules.values()))
