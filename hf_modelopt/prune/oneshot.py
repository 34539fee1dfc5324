"""One-shot pruning of causal LMs with calibration data: Wanda and SparseGPT, unstructured or N:M.

Both go through the transformer blocks one at a time: the calibration activations entering block i are
kept (one block's worth of memory), block i's Linear layers are pruned from statistics of their inputs,
and the pruned block's outputs become block i+1's inputs, so each block is pruned knowing what the
blocks before it now compute.

- Wanda (Sun et al. 2023, https://arxiv.org/abs/2306.11695): score |W_ij| · ||X_j||₂, weights compared
  within each output row; no weight update.
- SparseGPT (Frantar & Alistarh 2023, https://arxiv.org/abs/2301.00774): approximate second-order
  pruning with the Hessian H = XᵀX; the weights that stay are updated to compensate for those removed.
- magnitude: |W_ij| within each matrix, the baseline the two are measured against.
"""

from __future__ import annotations

import logging

import torch

from ..blocks import transformer_layers
from ..compat import require_support
from ..formats.experts import ExpertSlice, expert_intermediate, routed_tokens
from ..formats.modules import zero_fraction
from ..inplace import changes_in_place
from .masks import linear_weight, prunable_linears

logger = logging.getLogger("hf_modelopt")


class _StopForward(Exception):
    pass


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M): N of every M consecutive input weights are zeroed."""
    if pattern == "unstructured":
        return None
    n, _, m = pattern.partition(":")
    return int(n), int(m)


def _block_inputs(layers, model, batches) -> list[list[tuple]]:
    """For each block and each calibration batch, the positional and keyword arguments the model itself passes
    to that block: `captured[i][b] = (args, kwargs)`.

    Every block's own arguments are recorded, not block 0's reused: models with `layer_types` (gemma2, gemma3,
    modernbert) give sliding-window and full-attention blocks different masks, gemma3 different rotary
    embeddings. Only block 0's hidden states are kept (block i > 0 is fed the pruned output of block i - 1, so
    its recorded hidden states would be stale, and holding them would cost a copy of the activations per block).
    """
    captured: list[list[tuple]] = [[] for _ in layers]

    def catcher(index):
        def catch(module, args, kwargs):
            if index:
                args, kwargs = _with_hidden_states(args, kwargs, None)
            captured[index].append((args, kwargs))
            if index == len(layers) - 1:  # what follows the last block (final norm, head) is not needed
                raise _StopForward
        return catch

    handles = [layer.register_forward_pre_hook(catcher(i), with_kwargs=True) for i, layer in enumerate(layers)]
    batches = list(batches)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    for index, calls in enumerate(captured):
        if len(calls) != len(batches):  # a block skipped or called twice: its inputs cannot be matched to batches
            raise ValueError(f"one-shot calibration: block {index} was called {len(calls)} times for "
                             f"{len(batches)} batches; it needs one call per block per batch")
    return captured


def _run_block(block, args, kwargs):
    output = block(*args, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _with_hidden_states(args, kwargs, hidden_states):
    """The same block call with new hidden states (passed positionally or by keyword)."""
    if args:
        return (hidden_states, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden_states}


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float, nm=None) -> torch.Tensor:
    """Keep-mask of Wanda: score |W|·||X_j|| compared within each output row (or each N:M group)."""
    score = weight.abs().float() * input_norm.float().unsqueeze(0)
    return _mask_from_score(score, sparsity, nm, per_row=True)


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm=None) -> torch.Tensor:
    return _mask_from_score(weight.abs().float(), sparsity, nm, per_row=False)


def _mask_from_score(score: torch.Tensor, sparsity: float, nm, per_row: bool) -> torch.Tensor:
    score = score.contiguous()
    keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    if nm is not None:
        n, m = nm
        groups = score.view(score.shape[0], -1, m)
        drop = torch.topk(groups, n, dim=-1, largest=False).indices
        keep.view(score.shape[0], -1, m).scatter_(-1, drop, False)
        return keep
    if per_row:
        count = int(score.shape[1] * sparsity)
        if count:
            keep.scatter_(1, torch.topk(score, count, dim=1, largest=False).indices, False)
        return keep
    count = int(score.numel() * sparsity)
    if count:
        keep.view(-1)[torch.topk(score.flatten(), count, largest=False).indices] = False
    return keep


@torch.no_grad()
def sparsegpt_prune_(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm=None,
                     block_size: int = 128, dampening: float = 0.01) -> None:
    """Prune `weight` (out × in) in place with SparseGPT, given H = Σ x xᵀ over its calibration inputs."""
    W = weight.detach().float().clone()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += dampening * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    columns = W.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        if nm is None:  # the block's mask from the OBS saliency w² / [H⁻¹]²_jj
            saliency = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            threshold = torch.sort(saliency.flatten())[0][int(saliency.numel() * sparsity)]
            pruned = saliency <= threshold if int(saliency.numel() * sparsity) else torch.zeros_like(W1, dtype=bool)
        else:
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(end - start):
            w, d = W1[:, i], Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                saliency = W1[:, i:i + nm[1]] ** 2 / torch.diag(Hinv1)[i:i + nm[1]].reshape(1, -1) ** 2
                pruned.scatter_(1, i + torch.topk(saliency, nm[0], dim=1, largest=False).indices, True)
            q = w.clone()
            q[pruned[:, i]] = 0
            Q1[:, i] = q
            error = (w - q) / d
            W1[:, i:] -= error.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = error
        W[:, start:end] = Q1
        W[:, end:] -= Err1.matmul(Hinv[start:end, end:])
    weight.copy_(W.to(weight.dtype))


@changes_in_place
@torch.no_grad()
def prune_oneshot_(model, batches, method: str = "wanda", sparsity: float = 0.5, pattern: str = "unstructured",
                   targets=("*",), exclude=(), block_size: int = 128, dampening: float = 0.01,
                   progress: bool = True) -> dict[str, float]:
    """Prune a causal LM in place, block by block, from calibration `batches` (dicts of input tensors).

    Returns the measured sparsity of each pruned Linear layer and expert matrix. Mixture-of-experts blocks: each
    expert's matrix is pruned as its own matrix, calibrated on the tokens the router sends that expert.
    """
    require_support("one-shot pruning", model)
    nm = parse_pattern(pattern)
    prefix, layers = transformer_layers(model)
    modules = prunable_linears(model, targets, exclude)
    model.eval()
    if method == "magnitude":  # needs no data
        for module in modules.values():
            weight = linear_weight(module)
            weight.mul_(magnitude_mask(weight, sparsity, nm))
        return {name: zero_fraction(m.weight) for name, m in modules.items()}

    captured = _block_inputs(layers, model, batches)
    inputs = captured[0]
    iterator = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"{method} pruning", unit="block")
    report, uncalibrated = {}, []
    for index in iterator:
        block = layers[index]
        mine = {name: m for name, m in modules.items() if name.startswith(f"{prefix}.{index}.")}
        stats = {name: _new_stats(m, method) for name, m in mine.items()}
        handles = [m.register_forward_hook(_collector(stats[name], method)) for name, m in mine.items()
                   if not isinstance(m, ExpertSlice)]
        handles += _expert_collectors(mine, stats, method)
        for args, kwargs in inputs:
            _run_block(block, args, kwargs)
        for handle in handles:
            handle.remove()
        for name, module in mine.items():
            s, weight = stats[name], linear_weight(module)
            if s["tokens"] == 0 and isinstance(module, ExpertSlice):
                # No calibration token was routed to this expert: nothing to weigh its inputs by (and SparseGPT's
                # empty Hessian would zero it all); its rows are pruned by |W|, Wanda's rule with equal norms.
                uncalibrated.append(name)
                weight.mul_(wanda_mask(weight, torch.ones(weight.shape[1]), sparsity, nm))
            elif method == "wanda":
                norm = torch.sqrt(s["sum_sq"] / max(s["tokens"], 1))
                weight.mul_(wanda_mask(weight, norm, sparsity, nm))
            elif method == "sparsegpt":
                sparsegpt_prune_(weight, s["hessian"] * (2 / max(s["tokens"], 1)), sparsity, nm,
                                 block_size, dampening)
            else:
                raise ValueError(f"unknown one-shot method {method!r}: use wanda, sparsegpt or magnitude")
            report[name] = zero_fraction(module.weight)
        if index + 1 < len(layers):
            # The next block gets its own recorded arguments with the pruned block's outputs as hidden states.
            inputs = [_with_hidden_states(args, kwargs, _run_block(block, *call))
                      for call, (args, kwargs) in zip(inputs, captured[index + 1])]
            captured[index] = None  # free this block's arguments
    if uncalibrated:
        logger.warning("one-shot pruning: no calibration token was routed to %d expert matrices (%s%s); they were "
                       "pruned by magnitude per row", len(uncalibrated), ", ".join(uncalibrated[:4]),
                       ", ..." if len(uncalibrated) > 4 else "")
    return report


def _new_stats(module, method):
    columns = linear_weight(module).shape[1]
    if method == "sparsegpt":
        return {"hessian": torch.zeros(columns, columns, dtype=torch.float32), "tokens": 0}
    return {"sum_sq": torch.zeros(columns, dtype=torch.float32), "tokens": 0}


def _accumulate(stats, method, x: torch.Tensor) -> None:
    x = x.detach().reshape(-1, x.shape[-1]).float()
    stats["tokens"] += x.shape[0]
    if method == "sparsegpt":
        stats["hessian"] += x.T @ x
    else:
        stats["sum_sq"] += (x * x).sum(0)


def _collector(stats, method):
    def hook(module, args, output):
        _accumulate(stats, method, args[0])

    return hook


def _expert_collectors(mine: dict, stats: dict, method: str) -> list:
    """Hooks on the experts modules of `mine`'s expert matrices: each expert's statistics come from the tokens the
    router sends it (its first projection's inputs) and what its activation makes of them (`down_proj`'s)."""
    by_experts: dict[int, tuple] = {}
    for name, module in mine.items():
        if isinstance(module, ExpertSlice):
            by_experts.setdefault(id(module.experts), (module.experts, {}))[1][name] = module

    def collector(experts, slices):
        def hook(module, args, kwargs):
            hidden, routed = routed_tokens(experts, args, kwargs)
            for name, part in slices.items():
                tokens = routed[part.index]
                if tokens.numel() == 0:
                    continue
                x = hidden[tokens]
                if part.param_name == "down_proj":
                    x = expert_intermediate(experts, part.index, x)
                _accumulate(stats[name], method, x)

        return hook

    return [experts.register_forward_pre_hook(collector(experts, slices), with_kwargs=True)
            for experts, slices in by_experts.values()]


def calibration_batches(dataset, count: int, batch_size: int = 8):
    """The first `count` examples of a tokenized causal-LM dataset, as batches of tensors."""
    count = min(count, len(dataset))
    for start in range(0, count, batch_size):
        rows = dataset.select(range(start, min(start + batch_size, count)))
        yield {"input_ids": torch.tensor(rows["input_ids"]), "attention_mask": torch.tensor(rows["attention_mask"])}
