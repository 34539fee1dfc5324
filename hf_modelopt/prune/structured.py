"""Structured pruning: attention heads and FFN neurons scored, then physically removed.

The Linear layers are rebuilt smaller, so the pruned model does less work, not just multiplies by zeros.
transformers 5 has no `prune_heads` any more; this module does it for BERT-like (BERT, RoBERTa,
DistilBERT) and Llama-like (Llama, Qwen2, Mistral) blocks. With grouped-query attention each key/value
head keeps the same number of query heads, so the groups stay consistent.

Saving: when the config can describe the smaller model (FFN width everywhere; head count of Llama-like
models, whose `head_dim` is explicit), only the config changes and plain `from_pretrained` loads it.
BERT-like models derive the head size from hidden_size / num_attention_heads, so fewer heads cannot be
written in their config: the new Linear shapes go into `quantization_config` (`quant_method:
hf_modelopt`) and the model loads after `import hf_modelopt` (see `formats/hf_modelopt.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..distill.student import transformer_layers

logger = logging.getLogger("hf_modelopt")


@dataclass(frozen=True)
class BlockLayout:
    """Where a block's attention and FFN projections are, relative to the block."""

    query: str
    key: str
    value: str
    out: str
    ffn_in: tuple[str, ...]  # their rows are the neurons
    ffn_out: str  # its columns are the neurons
    heads_in_config: bool  # the config can express a smaller head count (explicit head_dim)


BERT_LAYOUT = BlockLayout("attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense", ("intermediate.dense",), "output.dense", False)
DISTILBERT_LAYOUT = BlockLayout("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin",
                                ("ffn.lin1",), "ffn.lin2", False)
LLAMA_LAYOUT = BlockLayout("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", True)
LAYOUTS = {"bert": BERT_LAYOUT, "roberta": BERT_LAYOUT, "distilbert": DISTILBERT_LAYOUT,
           "llama": LLAMA_LAYOUT, "qwen2": LLAMA_LAYOUT, "mistral": LLAMA_LAYOUT}


def block_layout(model) -> BlockLayout:
    model_type = model.config.model_type
    if model_type not in LAYOUTS:
        raise ValueError(f"structured pruning supports {sorted(LAYOUTS)}; got model_type {model_type!r}")
    return LAYOUTS[model_type]


def head_geometry(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) of a model config."""
    heads = getattr(config, "num_attention_heads", None) or config.n_heads
    hidden = getattr(config, "hidden_size", None) or config.dim
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return heads, kv_heads, head_dim


def _module(model, name):
    return model.get_submodule(name)


def _slice_linear_(model, name: str, rows=None, cols=None) -> None:
    """Keep only `rows` (output features) or `cols` (input features) of Linear `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    weight, bias = old.weight.detach(), None if old.bias is None else old.bias.detach()
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                          dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(old.training)
    setattr(parent, child, new)


# --------------------------------------------------------------------------- importance


def magnitude_importance(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: a score per query head and per FFN neuron from the squared norms of their weights."""
    layout = block_layout(model)
    prefix, layers = transformer_layers(model)
    heads, kv_heads, head_dim = head_geometry(model.config)
    group = heads // kv_heads
    head_scores, neuron_scores = [], []
    for i in range(len(layers)):
        block = f"{prefix}.{i}."
        q = _module(model, block + layout.query).weight.detach().float()
        o = _module(model, block + layout.out).weight.detach().float()
        score = q.view(heads, -1).pow(2).sum(1) + o.view(o.shape[0], heads, head_dim).pow(2).sum((0, 2))
        for name in (layout.key, layout.value):  # a key/value head is shared by its group of query heads
            kv = _module(model, block + name).weight.detach().float().view(kv_heads, -1).pow(2).sum(1)
            score = score + kv.repeat_interleave(group) / group
        head_scores.append(score)
        neuron = _module(model, block + layout.ffn_out).weight.detach().float().pow(2).sum(0)
        for name in layout.ffn_in:
            neuron = neuron + _module(model, block + name).weight.detach().float().pow(2).sum(1)
        neuron_scores.append(neuron)
    return head_scores, neuron_scores


def gradient_importance(model, batches, loss_fn=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: E|∂L/∂gate| for a gate on each head's and each neuron's output (Michel et al. 2019,
    https://arxiv.org/abs/1905.10650; Molchanov et al. 2019 for neurons).

    A gate multiplying head h's output scales the output projection's columns of h, so ∂L/∂gate_h =
    Σ W_o[:, h] · ∂L/∂W_o[:, h]; likewise for a neuron and the FFN output projection's column.
    `batches` yields model inputs with labels; `loss_fn(model, batch)` defaults to the model's own loss.
    """
    layout = block_layout(model)
    prefix, layers = transformer_layers(model)
    heads, _, head_dim = head_geometry(model.config)
    outs = [_module(model, f"{prefix}.{i}.{layout.out}") for i in range(len(layers))]
    downs = [_module(model, f"{prefix}.{i}.{layout.ffn_out}") for i in range(len(layers))]
    head_scores = [torch.zeros(heads) for _ in layers]
    neuron_scores = [torch.zeros(d.weight.shape[1]) for d in downs]
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
            for i, (o, d) in enumerate(zip(outs, downs)):
                gate = (o.weight * o.weight.grad).float()
                head_scores[i] += gate.view(gate.shape[0], heads, head_dim).sum((0, 2)).abs().cpu()
                neuron_scores[i] += (d.weight * d.weight.grad).float().sum(0).abs().cpu()
        count += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if count == 0:
        raise ValueError("gradient importance needs at least one calibration batch")
    return [s / count for s in head_scores], [s / count for s in neuron_scores]


def choose_kept(head_scores, neuron_scores, heads_fraction: float, neurons_fraction: float, kv_heads: int):
    """The heads and neurons each layer keeps: the same count in every layer, best-scored first.

    With grouped-query attention every key/value group keeps the same number of query heads.
    """
    keep_heads, keep_neurons = [], []
    for scores in head_scores:
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


def remove_heads_and_neurons_(model, keep_heads: list[list[int]] | None, keep_neurons: list[list[int]] | None):
    """Rebuild each block's projections with only the kept heads / neurons, and update the config.

    `keep_heads[i]` lists the query heads layer i keeps (None: all); `keep_neurons[i]` its FFN neurons.
    Returns the model (changed in place).
    """
    layout = block_layout(model)
    prefix, layers = transformer_layers(model)
    heads, kv_heads, head_dim = head_geometry(model.config)
    group = heads // kv_heads
    shapes: dict[str, list[int]] = {}
    for i in range(len(layers)):
        block = f"{prefix}.{i}."
        if keep_heads is not None and len(keep_heads[i]) < heads:
            kept = keep_heads[i]
            rows = torch.tensor([h * head_dim + d for h in kept for d in range(head_dim)])
            _slice_linear_(model, block + layout.query, rows=rows)
            _slice_linear_(model, block + layout.out, cols=rows)
            if group == 1:  # one key/value head per query head: they go together
                _slice_linear_(model, block + layout.key, rows=rows)
                _slice_linear_(model, block + layout.value, rows=rows)
            elif len(kept) % kv_heads or any(sum(1 for h in kept if h // group == g) != len(kept) // kv_heads
                                             for g in range(kv_heads)):
                raise ValueError(f"layer {i}: with grouped-query attention every key/value head must keep the "
                                 f"same number of query heads; kept {kept}")
        if keep_neurons is not None:
            index = torch.tensor(keep_neurons[i])
            for name in layout.ffn_in:
                _slice_linear_(model, block + name, rows=index)
            _slice_linear_(model, block + layout.ffn_out, cols=index)
        for name in (layout.query, layout.key, layout.value, layout.out, *layout.ffn_in, layout.ffn_out):
            weight = _module(model, block + name).weight
            shapes[block + name] = list(weight.shape)
    _update_config(model, layout, keep_heads, keep_neurons, shapes, heads, kv_heads, head_dim)
    return model


def _update_config(model, layout, keep_heads, keep_neurons, shapes, heads, kv_heads, head_dim) -> None:
    config = model.config
    head_counts = {len(k) for k in keep_heads} if keep_heads is not None else {heads}
    neuron_counts = {len(k) for k in keep_neurons} if keep_neurons is not None else set()
    in_config = True
    if len(neuron_counts) == 1:
        width = neuron_counts.pop()
        if hasattr(config, "intermediate_size"):
            config.intermediate_size = width
        elif hasattr(config, "hidden_dim"):
            config.hidden_dim = width
        else:
            in_config = False
    elif neuron_counts:
        in_config = False
    if head_counts != {heads}:
        if layout.heads_in_config and len(head_counts) == 1:
            config.head_dim = head_dim  # explicit from now on: it no longer equals hidden_size / heads
            config.num_attention_heads = head_counts.pop()
            model_attention_update(model, config)
        else:
            in_config = False
    if in_config:
        return
    from ..formats.hf_modelopt import register_loading_hooks

    register_loading_hooks()
    config.quantization_config = {"quant_method": "hf_modelopt", "layer_shapes": shapes}
    logger.info("structured pruning: the new layer shapes are not expressible in a %s config; the model loads "
                "with from_pretrained after `import hf_modelopt`", config.model_type)


def model_attention_update(model, config) -> None:
    """Llama-like attention modules cache the query/key-value ratio: refresh it after removing heads."""
    for module in model.modules():
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
