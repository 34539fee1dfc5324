"""Physical removal to a uniform shape: blocks (depth), key/value groups and query heads, FFN neurons and
embedding channels (hidden size). Every block keeps the same widths, so the result is a plain config of the same
family that loads with `from_pretrained`, no hf-modelopt needed. Query heads within groups and FFN neurons are
removed by `prune.structured.remove_heads_and_neurons_`; the rest is here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import UserError
from ...formats.modules import set_attention_heads_
from ..structured import _ffn_in, _slice_linear_, head_geometry, remove_heads_and_neurons_
from .importance import MinitronImportance
from .layout import decoder_layout

# Config entries holding one value per block, cut with the blocks (Qwen2 / Qwen3 sliding-window layers).
PER_LAYER_CONFIG_KEYS = ("layer_types",)


def current_shape(model) -> dict[str, int]:
    config = model.config
    heads, kv_heads, _ = head_geometry(config)
    return {"num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads}


def resolve_shape(model, target: dict[str, int]) -> dict[str, int]:
    """The complete target shape (unset fields keep the model's), or a `UserError` naming the field that cannot be
    reached by removal with the same width in every block."""
    shape = current_shape(model)
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    new = {**shape, **target}
    if "num_key_value_heads" not in target and heads == kv_heads:  # one key/value head per query head
        new["num_key_value_heads"] = new["num_attention_heads"]
    for key, value in new.items():
        if value > shape[key]:
            raise UserError(f"Minitron pruning: {key}={value} is larger than the model's {shape[key]}; pruning "
                            f"only removes, so give at most {shape[key]}")
    new_heads, new_kv = new["num_attention_heads"], new["num_key_value_heads"]
    if heads == kv_heads and new_heads != new_kv:
        raise UserError(f"Minitron pruning: the model has one key/value head per query head, so "
                        f"num_key_value_heads must equal num_attention_heads ({new_heads}); got {new_kv}")
    if new_heads % new_kv or new_heads // new_kv > heads // kv_heads:
        raise UserError(f"Minitron pruning: num_attention_heads={new_heads} must be a multiple of "
                        f"num_key_value_heads={new_kv} with at most {heads // kv_heads} query heads per key/value "
                        f"head (the model's groups)")
    return new


def remove_blocks_(model, drop: list[int]) -> None:
    """Remove the blocks `drop`, renumber the rest (their attention's `layer_idx`: the cache slot) and cut the
    config's block count and per-block lists."""
    layout, _ = decoder_layout(model)
    parent_name, _, child = layout.layers.rpartition(".")
    layers = model.get_submodule(layout.layers)
    kept = [i for i in range(len(layers)) if i not in set(drop)]
    setattr(model.get_submodule(parent_name), child, torch.nn.ModuleList([layers[i] for i in kept]))
    for new_index, layer in enumerate(model.get_submodule(layout.layers)):
        layer.get_submodule(layout.attention).layer_idx = new_index
    config = model.config
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) == config.num_hidden_layers:
            setattr(config, key, [values[i] for i in kept])
    config.num_hidden_layers = len(kept)


def remove_kv_groups_(model, keep_groups: list[list[int]]) -> None:
    """Keep, in block i, the key/value heads `keep_groups[i]` (the same count in every block) with all their query
    heads."""
    layout, block = decoder_layout(model)
    heads, kv_heads, head_dim = head_geometry(model.config)
    group = heads // kv_heads
    for layer, kept in zip(model.get_submodule(layout.layers), keep_groups):
        kv_rows = torch.tensor([g * head_dim + d for g in kept for d in range(head_dim)])
        query_rows = torch.tensor([(g * group + q) * head_dim + d for g in kept for q in range(group)
                                   for d in range(head_dim)])
        _slice_linear_(layer, block.query, rows=query_rows)
        _slice_linear_(layer, block.key, rows=kv_rows)
        _slice_linear_(layer, block.value, rows=kv_rows)
        _slice_linear_(layer, block.out, cols=query_rows)
        set_attention_heads_(layer.get_submodule(block.attention), len(kept) * group, len(kept), head_dim)
    model.config.num_attention_heads = len(keep_groups[0]) * group
    model.config.num_key_value_heads = len(keep_groups[0])


def remove_hidden_channels_(model, keep: list[int]) -> None:
    """Keep the embedding channels `keep` everywhere the residual stream goes: the embeddings (and the LM head,
    tied or not), every norm over it, the input columns of the projections reading it and the output rows of
    those writing it.

    RMSNorm divides by the root mean square over the channels it sees. The dropped channels are the quiet ones,
    so over the kept channels the mean square is about hidden_size / kept times larger: each norm weight is
    scaled by sqrt(hidden_size / kept) to give the next layer the scale it was trained on. (With the dropped
    channels zeroed instead, the pruned model computes exactly the same, up to the norms' epsilon.)
    """
    layout, block = decoder_layout(model)
    index = torch.tensor(sorted(keep), dtype=torch.long)
    scale = math.sqrt(model.config.hidden_size / len(keep))
    embeddings, lm_head = model.get_submodule(layout.embeddings), model.get_submodule(layout.lm_head)
    tied = lm_head.weight is embeddings.weight
    with torch.no_grad():
        norms = [model.get_submodule(layout.final_norm)]
        for layer in model.get_submodule(layout.layers):
            norms += [layer.get_submodule(name) for name in layout.block_norms]
            for name in (block.query, block.key, block.value, *_ffn_in(layer, "", block)):
                _slice_linear_(layer, name, cols=index)
            for name in (block.out, block.ffn_out):
                _slice_linear_(layer, name, rows=index)
        for norm in norms:
            norm.weight = torch.nn.Parameter(norm.weight[index] * scale, requires_grad=norm.weight.requires_grad)
        embeddings.weight = torch.nn.Parameter(embeddings.weight[:, index].clone(),
                                               requires_grad=embeddings.weight.requires_grad)
        embeddings.embedding_dim = len(keep)
        if tied:
            lm_head.weight, lm_head.in_features = embeddings.weight, len(keep)
        else:
            _slice_linear_(model, layout.lm_head, cols=index)
    model.config.hidden_size = len(keep)


def _top(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.topk(scores, count).indices.tolist())


@dataclass
class MinitronPlan:
    """What a pruned model keeps, in the unpruned model's numbering; each kept block keeps the same counts."""

    kept_layers: list[int]
    kept_kv_groups: list[list[int]]  # per kept block: its key/value heads
    kept_heads: list[list[int]]  # per kept block: its query heads (all inside its kept groups)
    kept_neurons: list[list[int]]  # per kept block
    kept_hidden: list[int]  # embedding channels (the same everywhere: the residual stream)


def choose_plan(model, importance: MinitronImportance, shape: dict[str, int], depth_importance: str) -> MinitronPlan:
    """The most important units at `shape` (from `resolve_shape`): the best blocks by `depth_importance`; in each
    kept block its best key/value groups, then its best query heads inside each kept group (so every group keeps
    as many, as `prune.structured` requires), and its best FFN neurons; the best embedding channels overall."""
    heads, kv_heads, _ = head_geometry(model.config)
    group, new_group = heads // kv_heads, shape["num_attention_heads"] // shape["num_key_value_heads"]
    kept_layers = _top(importance.layer_importance(depth_importance), shape["num_hidden_layers"])
    kept_groups, kept_heads = [], []
    for i in kept_layers:
        groups = _top(importance.kv_groups[i], shape["num_key_value_heads"])
        kept_groups.append(groups)
        kept_heads.append([g * group + q for g in groups
                           for q in _top(importance.heads[i][g * group:(g + 1) * group], new_group)])
    return MinitronPlan(kept_layers, kept_groups, kept_heads,
                        [_top(importance.neurons[i], shape["intermediate_size"]) for i in kept_layers],
                        _top(importance.hidden, shape["hidden_size"]))


def apply_plan_(model, plan: MinitronPlan) -> None:
    """Remove from `model` (unpruned, the one `plan` was chosen on) everything `plan` does not keep."""
    config = model.config
    heads, kv_heads, head_dim = head_geometry(config)
    config.head_dim = head_dim  # explicit from now on: hidden_size / num_attention_heads may change
    group = heads // kv_heads
    dropped = [i for i in range(config.num_hidden_layers) if i not in plan.kept_layers]
    if dropped:
        remove_blocks_(model, dropped)
    keep_heads = plan.kept_heads
    if group > 1 and len(plan.kept_kv_groups[0]) < kv_heads:
        remove_kv_groups_(model, plan.kept_kv_groups)
        # the kept groups' query heads, numbered as they now stand: group position * group size + rank in group
        keep_heads = [[groups.index(h // group) * group + h % group for h in kept]
                      for groups, kept in zip(plan.kept_kv_groups, plan.kept_heads)]
    keep_heads = keep_heads if len(keep_heads[0]) < head_geometry(config)[0] else None
    keep_neurons = plan.kept_neurons if len(plan.kept_neurons[0]) < config.intermediate_size else None
    if keep_heads is not None or keep_neurons is not None:
        remove_heads_and_neurons_(model, keep_heads, keep_neurons)
    if len(plan.kept_hidden) < config.hidden_size:
        remove_hidden_channels_(model, plan.kept_hidden)
