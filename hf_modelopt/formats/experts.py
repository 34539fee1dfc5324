"""Mixture-of-experts layers as transformers 5 holds them, declared once for every technique and report.

transformers 5 stores the experts of an MoE block (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss and
the other families decorated with `@use_experts_implementation`) as fused 3-D parameters of one `experts` module:
`gate_up_proj` (or `up_proj`) and `down_proj`, one matrix per expert along dimension 0. They are not `nn.Linear`,
so anything that walks Linear layers misses them. Here:

- `experts_modules(root)`: the experts modules under `root`, found by their fused 3-D parameters;
- `expert_matrices(experts)`: each expert's matrix of each fused parameter as an `ExpertSlice`, which stands in
  for a Linear layer wherever pruning reads `.weight` (a view: changing it changes the fused parameter);
- `ROUTER_NAMES`: the modules beside `experts` that route tokens (`gate`, `router`, qwen2_moe's
  `shared_expert_gate`); they stay dense, as llm-compressor and the SparseGPT / Wanda MoE work leave them;
- `routed_tokens(experts, args, kwargs)`: which tokens the router sent to each expert, read from the arguments the
  MoE block passes its experts module (hidden states, top-k expert indices, top-k weights);
- `expert_intermediate(experts, index, x)`: what expert `index`'s `down_proj` receives for its inputs `x`.

This module is a leaf (formats imports nothing of hf_modelopt): pruning, quantization and export read it alike.
"""

from __future__ import annotations

import inspect

import torch

# The fused 3-D parameters of an experts module, first projection(s) first.
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
# Children of an MoE block (the parent of `experts`) that compute the routing: never pruned, named in reports.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
# Experts classes not decorated by transformers' `@use_experts_implementation` (which records the layout as
# `is_transposed`): whether their matrices are stored (in, out) rather than (out, in), read from their forward.
TRANSPOSED_WITHOUT_DECORATOR = {"Llama4TextExperts": True}


def _fused(module, name) -> torch.nn.Parameter | None:
    param = module._parameters.get(name)
    return param if param is not None and param.dim() == 3 else None


def is_experts_module(module) -> bool:
    """A module holding experts as fused 3-D parameters (a `down_proj` and a `gate_up_proj` or `up_proj`)."""
    return _fused(module, "down_proj") is not None and (_fused(module, "gate_up_proj") is not None
                                                        or _fused(module, "up_proj") is not None)


def is_transposed(experts) -> bool:
    """Whether each expert's matrix is stored (in_features, out_features) instead of Linear's (out, in)."""
    if hasattr(experts, "is_transposed"):
        return bool(experts.is_transposed)
    name = type(experts).__name__
    if name not in TRANSPOSED_WITHOUT_DECORATOR:
        raise ValueError(f"{name}: fused expert weights of unknown layout (not decorated by transformers' "
                         f"@use_experts_implementation); add it to hf_modelopt.formats.experts."
                         f"TRANSPOSED_WITHOUT_DECORATOR")
    return TRANSPOSED_WITHOUT_DECORATOR[name]


def experts_modules(root) -> dict[str, torch.nn.Module]:
    """`{name relative to root: experts module}` for every experts module under `root`."""
    return {name: module for name, module in root.named_modules() if is_experts_module(module)}


def router_names(root) -> list[str]:
    """Names (relative to `root`) of the routing modules beside each experts module: kept dense."""
    found = []
    for name in experts_modules(root):
        parent_name = name.rpartition(".")[0]
        parent = root.get_submodule(parent_name) if parent_name else root
        prefix = f"{parent_name}." if parent_name else ""
        found += [prefix + child for child in ROUTER_NAMES if getattr(parent, child, None) is not None]
    return found


class ExpertSlice:
    """Expert `index`'s matrix of the fused parameter `param_name` of an experts module, used where pruning takes
    a Linear layer: `.weight` is a view of the fused parameter in its stored layout (`transposed`: (in, out)),
    so masks applied to it change the model's parameter."""

    def __init__(self, experts, param_name: str, index: int):
        self.experts, self.param_name, self.index = experts, param_name, index
        self.transposed = is_transposed(experts)

    @property
    def parameter(self) -> torch.nn.Parameter:
        return getattr(self.experts, self.param_name)

    @property
    def weight(self) -> torch.Tensor:
        param = self.parameter
        if type(param).__name__ == "DTensor" or hasattr(param, "ds_numel"):
            # A shard of a 3-D parameter does not hold whole experts: masks per expert cannot be applied to it.
            raise ValueError(f"{type(self.experts).__name__}.{self.param_name}: pruning fused expert weights "
                             "sharded by FSDP2 or DeepSpeed ZeRO-3 is not supported; prune on one process")
        return param[self.index]

    @property
    def weight_grad(self) -> torch.Tensor | None:
        grad = self.parameter.grad
        return None if grad is None else grad[self.index]

    def out_in(self) -> torch.Tensor:
        """The matrix as (out_features, in_features), as `nn.Linear` holds it (a view)."""
        return self.weight.t() if self.transposed else self.weight

    def __repr__(self):
        return f"ExpertSlice({type(self.experts).__name__}.{self.param_name}[{self.index}])"


def expert_matrices(experts) -> dict[str, ExpertSlice]:
    """`{"gate_up_proj.3": ExpertSlice, ...}`: every expert's matrix of every fused parameter of `experts`."""
    found = {}
    for param_name in EXPERT_WEIGHTS:
        param = _fused(experts, param_name)
        if param is not None:
            for index in range(param.shape[0]):
                found[f"{param_name}.{index}"] = ExpertSlice(experts, param_name, index)
    return found


def routing(experts, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the arguments of an experts module's forward (hidden states, top-k expert indices, top-k weights, by
    position or keyword): the hidden states (tokens, hidden), the top-k indices and weights (tokens, k)."""
    bound = inspect.signature(experts.forward).bind(*args, **kwargs)
    hidden, top_k_index, top_k_weights = list(bound.arguments.values())[:3]
    if not (isinstance(top_k_index, torch.Tensor) and not top_k_index.is_floating_point()):
        raise ValueError(f"{type(experts).__name__}.forward: its second argument is not the top-k expert indices; "
                         "per-expert calibration cannot read the routing")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden, top_k_index.reshape(hidden.shape[0], -1), top_k_weights.reshape(hidden.shape[0], -1)


def routed_tokens(experts, args, kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The hidden states (tokens, hidden) an experts module is called with and, for each expert, the indices of the
    tokens routed to it."""
    hidden, top_k_index, _ = routing(experts, args, kwargs)
    return hidden, [torch.nonzero((top_k_index == e).any(-1)).flatten() for e in range(expert_count(experts))]


def expert_intermediate(experts, index: int, x: torch.Tensor) -> torch.Tensor:
    """What expert `index`'s `down_proj` receives when the expert is given `x` (tokens, hidden): its first
    projection, bias, then the gated activation exactly as the experts module computes it."""
    first = "gate_up_proj" if _fused(experts, "gate_up_proj") is not None else "up_proj"
    weight = getattr(experts, first)[index]
    out = x @ weight if is_transposed(experts) else x @ weight.t()
    bias = getattr(experts, f"{first}_bias", None)
    if isinstance(bias, torch.Tensor):
        out = out + bias[index]
    if first == "gate_up_proj" and hasattr(experts, "_apply_gate"):
        return experts._apply_gate(out)
    if first == "gate_up_proj":  # undecorated: gate and up concatenated
        gate, up = out.chunk(2, dim=-1)
        return experts.act_fn(gate) * up
    return experts.act_fn(out)


# Config keys of the number of routed experts per MoE block and of experts chosen per token (mixtral, qwen*_moe,
# deepseek): what removing experts must update so the saved config builds the smaller model.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_topk")


def expert_count(experts) -> int:
    return _fused(experts, "down_proj").shape[0]


def router_of(moe_block, experts) -> torch.nn.Module | None:
    """The router of an MoE block: the `ROUTER_NAMES` child whose weight has one row per expert (not qwen2_moe's
    one-row `shared_expert_gate`)."""
    count = expert_count(experts)
    for name in ROUTER_NAMES:
        module = getattr(moe_block, name, None)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == count:
            return module
    return None


def expert_outputs(experts, index: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `index`'s output for its inputs `x` (tokens, hidden), before the routing weight."""
    weight = experts.down_proj[index]
    out = expert_intermediate(experts, index, x)
    out = out @ weight if is_transposed(experts) else out @ weight.t()
    bias = getattr(experts, "down_proj_bias", None)
    return out + bias[index] if isinstance(bias, torch.Tensor) else out
