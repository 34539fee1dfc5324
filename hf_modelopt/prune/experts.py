"""Structured removal of whole experts from mixture-of-experts blocks.

Each routed expert of each MoE block is scored on calibration tokens by how often the router picks it times the mean
norm of what it adds to the output (routing weight x expert output) when picked: the idea of REAP (router-weighted
expert activation pruning, Lasby et al. 2025), experts that are rarely used and contribute little go first. Every
block keeps the same number of experts (the config holds one count); the fused expert parameters and the router's
rows are sliced, and the config's expert count updated, so the result saves and loads with plain `from_pretrained`.

Removing expert e is the same as the router never choosing it: the pruned model computes what the original computes
with e's router logit set to -inf (softmax over the remaining logits, then top-k), which the tests check.
"""

from __future__ import annotations

import logging

import torch

from ..blocks import layer_stacks
from ..formats.experts import (
    EXPERT_COUNT_KEYS,
    TOP_K_KEYS,
    expert_count,
    expert_outputs,
    experts_modules,
    router_of,
    routing,
)
from ..inplace import changes_in_place

logger = logging.getLogger("hf_modelopt")


def moe_blocks(model) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """`{experts module name: (experts module, its router)}` for every MoE block inside the transformer blocks."""
    found = {}
    for stack in layer_stacks(model):
        for name, experts in experts_modules(stack.layers).items():
            parent = name.rpartition(".")[0]
            router = router_of(stack.layers.get_submodule(parent), experts)
            if router is None:
                raise ValueError(f"{stack.path}.{name}: no router beside it (a child named gate / router with one "
                                 "row per expert); expert removal needs one to slice")
            found[f"{stack.path}.{name}"] = (experts, router)
    return found


@torch.no_grad()
def expert_importance(model, batches) -> dict[str, torch.Tensor]:
    """`{experts module name: score per expert}`: routing frequency x mean ||routing weight x expert output|| over
    the tokens routed to the expert, from a forward pass over each calibration batch (dicts of model inputs)."""
    blocks = moe_blocks(model)
    sums = {name: torch.zeros(expert_count(e), dtype=torch.float64) for name, (e, _) in blocks.items()}
    picks = {name: torch.zeros(expert_count(e), dtype=torch.float64) for name, (e, _) in blocks.items()}
    tokens = dict.fromkeys(blocks, 0)

    def scorer(name, experts):
        def hook(module, args, kwargs):
            hidden, top_k_index, top_k_weights = routing(experts, args, kwargs)
            tokens[name] += hidden.shape[0]
            for e in range(expert_count(experts)):
                rows, slots = torch.nonzero(top_k_index == e, as_tuple=True)
                if rows.numel():
                    out = expert_outputs(experts, e, hidden[rows]) * top_k_weights[rows, slots, None]
                    sums[name][e] += out.float().norm(dim=-1).sum().double()
                    picks[name][e] += rows.numel()

        return hook

    handles = [e.register_forward_pre_hook(scorer(n, e), with_kwargs=True) for n, (e, _) in blocks.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not any(tokens.values()):
        raise ValueError("expert importance: no calibration batch reached an MoE block; pass batches= of model inputs")
    # frequency x mean norm when picked = (picks / tokens) x (sums / picks) = sums / tokens
    return {name: (sums[name] / max(tokens[name], 1)).float() for name in blocks}


def check_expert_count(model, experts: int) -> None:
    """Refuse, in one line (`ValueError`) and before anything changes, keeping `experts` experts per MoE block of
    `model`: it needs MoE blocks, a config key holding the expert count, and at least the experts chosen per token
    but fewer than there are. Reads shapes only (a model on the meta device will do)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no mixture-of-experts blocks (fused experts beside a router): "
                         "nothing for expert removal to remove")
    if not _config_keys(model.config, EXPERT_COUNT_KEYS):
        raise ValueError(f"{type(model.config).__name__} has none of {EXPERT_COUNT_KEYS}: the smaller expert count "
                         "could not be saved")
    top_k_keys = _config_keys(model.config, TOP_K_KEYS)
    top_k = min(getattr(model.config, key) for key in top_k_keys) if top_k_keys else 1
    old = min(expert_count(e) for e, _ in blocks.values())
    if not top_k <= experts < old:
        raise ValueError(f"keep {experts} experts per block: it must be at least the {top_k} chosen per token and "
                         f"fewer than the {old} there are")


def _config_keys(config, keys) -> list[str]:
    return [key for key in keys if isinstance(getattr(config, key, None), int)]


@changes_in_place
@torch.no_grad()
def remove_experts_(model, keep: dict[str, list[int]]) -> None:
    """Keep only the experts `keep[name]` (indices, same count in every block) of each MoE block, in place.

    The experts' fused parameters (and biases) and the router's rows (and any per-expert router bias) are sliced;
    the expert count in the modules and the config (`EXPERT_COUNT_KEYS`) is updated. Everything is checked before
    anything changes.
    """
    blocks = moe_blocks(model)
    counts = {len(kept) for kept in keep.values()}
    if set(keep) != set(blocks) or len(counts) != 1:
        raise ValueError(f"keep must name every MoE block ({', '.join(blocks)}) with the same number of experts "
                         "(the config holds one expert count)")
    new = counts.pop()
    check_expert_count(model, new)
    count_keys = _config_keys(model.config, EXPERT_COUNT_KEYS)
    for name, (experts, router) in blocks.items():
        index = torch.tensor(sorted(keep[name]))
        count = expert_count(experts)
        for module in (experts, router):
            for attr, param in list(module.named_parameters(recurse=False)):
                if param.shape[0] == count:
                    setattr(module, attr, torch.nn.Parameter(param.data[index].clone(),
                                                             requires_grad=param.requires_grad))
            for attr, buffer in list(module.named_buffers(recurse=False)):
                if buffer.dim() and buffer.shape[0] == count:
                    setattr(module, attr, buffer[index].clone())
            for attr in EXPERT_COUNT_KEYS:  # the counts modules cache from the config (one-hot sizes, loops)
                if getattr(module, attr, None) == count:
                    setattr(module, attr, new)
    for key in count_keys:
        setattr(model.config, key, new)


@changes_in_place
def remove_experts_by_importance_(model, batches, experts: int) -> dict:
    """Score the experts on `batches` and keep the `experts` most important in every MoE block; returns a report."""
    check_expert_count(model, experts)  # (before the scoring passes)
    scores = expert_importance(model, batches)
    keep = {name: sorted(torch.topk(score, min(experts, score.numel())).indices.tolist())
            for name, score in scores.items()}
    before = sum(p.numel() for p in model.parameters())
    remove_experts_(model, keep)
    after = sum(p.numel() for p in model.parameters())
    logger.info("expert removal: %d experts kept per MoE block; %.2f M -> %.2f M parameters", experts, before / 1e6,
                after / 1e6)
    return {"kept_experts": keep, "scores": {name: score.tolist() for name, score in scores.items()},
            "parameters_before": before, "parameters_after": after}
