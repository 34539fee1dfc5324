"""Structured pruning: attention heads and FFN neurons scored, then physically removed.

The Linear layers are rebuilt smaller, so the pruned model does less work, not just multiplies by zeros.
transformers 5 has no `prune_heads` any more; this module does it for every model type in `blocks.LAYOUTS` (the
single list of what structured pruning supports): BERT-like encoders (BERT, RoBERTa, XLM-RoBERTa, ELECTRA,
DeBERTa-v2, DistilBERT), ViT, the decoders GPT-2 (fused q|k|v Conv1D), OPT, GPT-NeoX (fused per-head
[q, k, v] rows), Phi, Llama, Mistral, Qwen2 and Qwen3, and the self-attention and FFN of both stacks of BART
and T5 (cross-attention keeps its heads). With grouped-query attention each key/value head keeps the same
number of query heads, so the groups stay consistent.

Saving: when the config can describe the smaller model (FFN width everywhere; the head count of models that
read an explicit `head_dim` from their config: ViT, Phi, Llama, Mistral, Qwen2, Qwen3), only the config
changes and plain `from_pretrained` loads it. Models that derive the head size from hidden_size /
num_attention_heads (BERT-like, GPT-2, OPT, GPT-NeoX, BART; T5 shares one head count among its stacks)
cannot write fewer heads in their config: the new Linear shapes and the attention modules' head counts go
into `quantization_config` (`quant_method: hf_modelopt`) and the model loads after `import hf_modelopt`
(see `formats/hf_modelopt.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..blocks import LAYOUTS, BlockLayout, layer_stacks  # noqa: F401  (LAYOUTS, BlockLayout re-exported)
from ..formats.modules import new_linear_like, set_attention_heads_
from ..inplace import changes_in_place

logger = logging.getLogger("hf_modelopt")


def block_layout(model) -> BlockLayout | tuple[BlockLayout, ...]:
    model_type = model.config.model_type
    if model_type not in LAYOUTS:
        raise ValueError(f"structured pruning does not support model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[model_type]


@dataclass(frozen=True)
class PrunableBlock:
    """One transformer block: its module path (with a trailing dot), layout and attention geometry."""

    prefix: str
    stack: str  # the layer stack's module path
    layout: BlockLayout
    heads: int
    kv_heads: int
    head_dim: int


def prunable_blocks(model) -> list[PrunableBlock]:
    """Every block structured pruning acts on, stack after stack (an encoder-decoder's encoder first); the
    per-layer lists of the functions below follow this order."""
    layouts = block_layout(model)
    layouts = layouts if isinstance(layouts, tuple) else (layouts,)
    stacks = layer_stacks(model)
    if len(stacks) != len(layouts):
        raise ValueError(f"{model.config.model_type}: expected {len(layouts)} layer stacks for structured pruning, "
                         f"found {[s.path for s in stacks]}")
    blocks = []
    for stack, layout in zip(stacks, layouts):
        heads, kv_heads, head_dim = head_geometry(model.config)
        if layout.heads_config_key:
            heads = kv_heads = getattr(model.config, layout.heads_config_key)
            head_dim = getattr(model.config, "d_kv", None) or model.config.d_model // heads  # (T5 states d_kv)
        blocks.extend(PrunableBlock(f"{stack.path}.{i}.", stack.path, layout, heads, kv_heads, head_dim)
                      for i in range(len(stack.layers)))
    return blocks


def head_geometry(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a model config."""
    heads = getattr(config, "num_attention_heads", None) or config.n_heads
    hidden = getattr(config, "hidden_size", None) or config.dim
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, kv_heads, head_dim


def _module(model, name):
    return model.get_submodule(name)


def _weight(module) -> torch.Tensor:
    """The weight as (out_features, in_features): a transposed view for GPT-2's Conv1D (an Embedding's as it is)."""
    return module.weight if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) else module.weight.t()


def _weight_gate(module) -> torch.Tensor:
    """W ⊙ ∂L/∂W as (out_features, in_features)."""
    gate = module.weight * module.weight.grad
    return gate if isinstance(module, torch.nn.Linear) else gate.t()


def _slice_linear_(model, name: str, rows=None, cols=None) -> None:
    """Keep only `rows` (output features) or `cols` (input features) of Linear (or Conv1D) `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    weight, bias = _weight(old).detach(), None if old.bias is None else old.bias.detach()
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    new = new_linear_like(old, weight.shape[0], weight.shape[1], bias=bias is not None)
    with torch.no_grad():
        _weight(new).copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(old.training)
    setattr(parent, child, new)


def _qkv_weights(model, block: str, layout: BlockLayout, heads: int, kv_heads: int, head_dim: int):
    """Query, key and value weights of a block as [heads, head_dim, in] (keys/values: [kv_heads, ...])."""
    if layout.fused_qkv is None:
        q, k, v = (_weight(_module(model, block + name)).detach().float()
                   for name in (layout.query, layout.key, layout.value))
        return q.view(heads, head_dim, -1), k.view(kv_heads, head_dim, -1), v.view(kv_heads, head_dim, -1)
    fused = _weight(_module(model, block + layout.fused_qkv)).detach().float()
    if layout.fused_per_head:
        per_head = fused.view(heads, 3, head_dim, -1)
        return per_head[:, 0], per_head[:, 1], per_head[:, 2]
    q, k, v = fused.view(3, heads, head_dim, -1)
    return q, k, v


def _head_rows(kept: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in kept for d in range(head_dim)], dtype=torch.long)


# --------------------------------------------------------------------------- importance


def magnitude_importance(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: a score per query head and per FFN neuron from the squared norms of their weights."""
    head_scores, neuron_scores = [], []
    for b in prunable_blocks(model):
        block, layout, group = b.prefix, b.layout, b.heads // b.kv_heads
        q, k, v = _qkv_weights(model, block, layout, b.heads, b.kv_heads, b.head_dim)
        o = _weight(_module(model, block + layout.out)).detach().float()
        score = q.pow(2).sum((1, 2)) + o.view(o.shape[0], b.heads, b.head_dim).pow(2).sum((0, 2))
        for kv in (k, v):  # a key/value head is shared by its group of query heads
            score = score + kv.pow(2).sum((1, 2)).repeat_interleave(group) / group
        head_scores.append(score)
        neuron = _weight(_module(model, block + layout.ffn_out)).detach().float().pow(2).sum(0)
        for name in _ffn_in(model, block, layout):
            neuron = neuron + _weight(_module(model, block + name)).detach().float().pow(2).sum(1)
        neuron_scores.append(neuron)
    return head_scores, neuron_scores


def gradient_importance(model, batches, loss_fn=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: E|∂L/∂gate| for a gate on each head's and each neuron's output (Michel et al. 2019,
    https://arxiv.org/abs/1905.10650; Molchanov et al. 2019 for neurons).

    A gate multiplying head h's output scales the output projection's columns of h, so ∂L/∂gate_h =
    Σ W_o[:, h] · ∂L/∂W_o[:, h]; likewise for a neuron and the FFN output projection's column.
    `batches` yields model inputs with labels; `loss_fn(model, batch)` defaults to the model's own loss.
    """
    blocks = prunable_blocks(model)
    outs = [_module(model, b.prefix + b.layout.out) for b in blocks]
    downs = [_module(model, b.prefix + b.layout.ffn_out) for b in blocks]
    head_scores = [torch.zeros(b.heads) for b in blocks]
    neuron_scores = [torch.zeros(_weight(d).shape[1]) for d in downs]
    was_training = model.training
    model.eval()  # no dropout: the scores measure the model as it is
    device = next(model.parameters()).device
    count = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        loss.backward()
        with torch.no_grad():
            for i, (b, o, d) in enumerate(zip(blocks, outs, downs)):
                gate = _weight_gate(o).float()
                head_scores[i] += gate.view(gate.shape[0], b.heads, b.head_dim).sum((0, 2)).abs().cpu()
                neuron_scores[i] += _weight_gate(d).float().sum(0).abs().cpu()
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if count == 0:
        raise ValueError("gradient importance needs at least one calibration batch")
    return [s / count for s in head_scores], [s / count for s in neuron_scores]


def choose_kept(head_scores, neuron_scores, heads_fraction: float, neurons_fraction: float,
                kv_heads: int | list[int], same_heads: list[list[int]] = ()):
    """The heads and neurons each layer keeps: the same count in every layer, best-scored first.

    With grouped-query attention every key/value group keeps the same number of query heads. `kv_heads`:
    the key/value head count of every layer, or one per layer (`prunable_blocks`). `same_heads`: groups of
    layers that must keep the same heads (`same_heads_layers`), chosen by their summed scores.
    """
    head_scores = list(head_scores)
    for group in same_heads:
        total = sum(head_scores[i] for i in group)
        for i in group:
            head_scores[i] = total
    keep_heads, keep_neurons = [], []
    per_layer_kv = kv_heads if isinstance(kv_heads, list) else [kv_heads] * len(head_scores)
    for scores, kv_heads in zip(head_scores, per_layer_kv):
        group = scores.numel() // kv_heads
        if group == 1:  # one key/value head per query head: heads compete across the whole layer
            count = max(1, round(scores.numel() * (1 - heads_fraction)))
            keep_heads.append(sorted(torch.topk(scores, count).indices.tolist()))
            continue
        per_group = max(1, round(group * (1 - heads_fraction)))
        kept = []
        for g in range(kv_heads):
            best = torch.topk(scores[g * group:(g + 1) * group], per_group).indices + g * group
            kept.extend(sorted(best.tolist()))
        keep_heads.append(kept)
    for scores in neuron_scores:
        count = max(1, round(scores.numel() * (1 - neurons_fraction)))
        keep_neurons.append(sorted(torch.topk(scores, count).indices.tolist()))
    return keep_heads, keep_neurons


# --------------------------------------------------------------------------- removal


@changes_in_place
def remove_heads_and_neurons_(model, keep_heads: list[list[int]] | None, keep_neurons: list[list[int]] | None):
    """Rebuild each block's projections with only the kept heads / neurons, and update the config.

    `keep_heads[i]` lists the query heads layer i keeps (None: all); `keep_neurons[i]` its FFN neurons;
    layers are counted as `prunable_blocks` lists them (an encoder-decoder's encoder, then its decoder).
    Returns the model (changed in place).
    """
    blocks = prunable_blocks(model)
    _check_kept(model, blocks, keep_heads, keep_neurons)
    shapes: dict[str, list[int]] = {}
    attention_heads: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        block, layout, group = b.prefix, b.layout, b.heads // b.kv_heads
        kept = keep_heads[i] if keep_heads is not None else list(range(b.heads))
        if len(kept) < b.heads:
            _remove_heads_(model, block, layout, kept, b.heads, group, b.head_dim)
        kept_kv = b.kv_heads if group > 1 else len(kept)
        set_attention_heads_(_module(model, block + layout.attention), len(kept), kept_kv, b.head_dim)
        attention_heads[block + layout.attention] = [len(kept), kept_kv, b.head_dim]
        if keep_neurons is not None:
            index = torch.tensor(keep_neurons[i], dtype=torch.long)
            for name in _ffn_in(model, block, layout):
                _slice_linear_(model, block + name, rows=index)
            _slice_linear_(model, block + layout.ffn_out, cols=index)
        for name in _projections(model, block, layout):
            shapes[block + name] = list(_weight(_module(model, block + name)).shape)
    _update_config(model, blocks, keep_heads, keep_neurons, shapes, attention_heads)
    return model


def same_heads_layers(model) -> list[list[int]]:
    """Groups of layers (as `prunable_blocks` counts them) that must keep the same heads (T5's stacks)."""
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(prunable_blocks(model)):
        if b.layout.shared_head_bias:
            groups.setdefault(b.stack, []).append(i)
    return list(groups.values())


def _check_kept(model, blocks: list[PrunableBlock], keep_heads, keep_neurons) -> None:
    """Every problem with the kept lists, raised before any layer changes."""
    for what, kept_lists in (("keep_heads", keep_heads), ("keep_neurons", keep_neurons)):
        if kept_lists is not None and len(kept_lists) != len(blocks):
            raise ValueError(f"{what} has {len(kept_lists)} entries; the model has {len(blocks)} layers")
    for i, b in enumerate(blocks):
        width = _weight(_module(model, b.prefix + b.layout.ffn_out)).shape[1]
        for what, kept_lists, count in (("keep_heads", keep_heads, b.heads), ("keep_neurons", keep_neurons, width)):
            kept = kept_lists[i] if kept_lists is not None else None
            if kept is not None and (not kept or len(set(kept)) != len(kept) or not all(0 <= k < count for k in kept)):
                raise ValueError(f"{what}[{i}] must list distinct indices in 0..{count - 1}, at least one; "
                                 f"got {kept}")
        group = b.heads // b.kv_heads
        kept = keep_heads[i] if keep_heads is not None else None
        if kept is not None and group > 1 and len(kept) < b.heads and (
                len(kept) % b.kv_heads or any(sum(1 for h in kept if h // group == g) != len(kept) // b.kv_heads
                                              for g in range(b.kv_heads))):
            raise ValueError(f"layer {i}: with grouped-query attention every key/value head must keep the "
                             f"same number of query heads; kept {kept}")
        first = next(j for j, other in enumerate(blocks) if other.stack == b.stack)
        if kept is not None and b.layout.shared_head_bias and sorted(kept) != sorted(keep_heads[first]):
            raise ValueError(f"layer {i} ({b.prefix.rstrip('.')}): every block of {b.stack} must keep the same "
                             f"heads (its first block's relative attention bias serves them all); kept {kept}, "
                             f"layer {first} kept {keep_heads[first]}")


def _projections(model, block: str, layout: BlockLayout) -> list[str]:
    names = [layout.fused_qkv] if layout.fused_qkv else [layout.query, layout.key, layout.value]
    names += [name for name in layout.head_rows_extra if _has_module(model, block + name)]
    if layout.shared_head_bias and _has_module(model, block + layout.shared_head_bias):
        names.append(layout.shared_head_bias)
    return names + [layout.out, *_ffn_in(model, block, layout), layout.ffn_out]


def _ffn_in(model, block: str, layout: BlockLayout) -> list[str]:
    return [name for name in layout.ffn_in if _has_module(model, block + name)]


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _remove_heads_(model, block: str, layout: BlockLayout, kept: list[int], heads: int, group: int,
                   head_dim: int) -> None:
    rows = _head_rows(kept, head_dim)
    if layout.fused_per_head:  # GPT-NeoX: head h owns rows [h·3d, (h+1)·3d) = [q_h, k_h, v_h]
        _slice_linear_(model, block + layout.fused_qkv, rows=_head_rows(kept, 3 * head_dim))
    elif layout.fused_qkv:  # GPT-2: [all queries | all keys | all values]
        width = heads * head_dim
        _slice_linear_(model, block + layout.fused_qkv, rows=torch.cat([rows, rows + width, rows + 2 * width]))
    else:
        _slice_linear_(model, block + layout.query, rows=rows)
        if group == 1:  # one key/value head per query head: they go together
            _slice_linear_(model, block + layout.key, rows=rows)
            _slice_linear_(model, block + layout.value, rows=rows)
        for name in layout.head_rows_extra:
            if _has_module(model, block + name):
                _slice_linear_(model, block + name, rows=rows)
    _slice_linear_(model, block + layout.out, cols=rows)
    if layout.shared_head_bias and _has_module(model, block + layout.shared_head_bias):
        bias = _module(model, block + layout.shared_head_bias)  # an Embedding: (buckets, heads)
        with torch.no_grad():
            bias.weight = torch.nn.Parameter(bias.weight[:, kept].clone(), requires_grad=bias.weight.requires_grad)
        bias.embedding_dim = len(kept)


def _heads_in_config(layout: BlockLayout, config) -> bool:
    # Phi sizes its optional q/k LayerNorms hidden_size // num_attention_heads: with them, fewer heads in the
    # config would change their shape, so the head count goes into the layer shapes instead.
    return layout.head_size_config_key is not None and not getattr(config, "qk_layernorm", False)


def _update_config(model, blocks: list[PrunableBlock], keep_heads, keep_neurons, shapes, attention_heads) -> None:
    config = model.config
    in_config = True
    if keep_neurons is not None:
        for key in {b.layout.ffn_config_key for b in blocks}:  # (T5's d_ff counts both stacks)
            widths = {len(kept) for b, kept in zip(blocks, keep_neurons) if b.layout.ffn_config_key == key}
            if len(widths) == 1:
                setattr(config, key, widths.pop())
            else:
                in_config = False
    for layout in dict.fromkeys(b.layout for b in blocks):  # each stack's layout, in order
        index = [i for i, b in enumerate(blocks) if b.layout == layout]
        heads, group, head_dim = blocks[index[0]].heads, blocks[index[0]].heads // blocks[index[0]].kv_heads, \
            blocks[index[0]].head_dim
        head_counts = {len(keep_heads[i]) for i in index} if keep_heads is not None else {heads}
        if head_counts == {heads}:
            continue
        if _heads_in_config(layout, config) and len(head_counts) == 1:
            count = head_counts.pop()
            # explicit from now on: it no longer equals hidden_size / heads
            setattr(config, layout.head_size_config_key, head_dim)
            config.num_attention_heads = count
            if group == 1 and getattr(config, "num_key_value_heads", None):
                config.num_key_value_heads = count
        else:
            in_config = False
    if in_config:
        return
    from ..formats.hf_modelopt import register_loading_hooks

    register_loading_hooks()
    config.quantization_config = {"quant_method": "hf_modelopt", "layer_shapes": shapes,
                                  "attention_heads": attention_heads}
    logger.info("structured pruning: the new layer shapes are not expressible in a %s config; the model loads "
                "with from_pretrained after `import hf_modelopt`", config.model_type)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
