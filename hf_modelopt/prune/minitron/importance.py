"""Activation importance for Minitron pruning, from forward hooks only (no backward pass: it fits wherever
inference fits). Muralidharan et al. 2024, https://arxiv.org/abs/2407.14679, section 2.2:

- FFN neuron: mean |activation| at the down-projection input;
- attention head: mean over tokens of the L2 norm of the head's output (the output projection's input, split
  per head); a key/value group scores the sum of its query heads;
- embedding channel: mean |activation| after every norm over the hidden channels (each block's two norms and the
  final norm), summed;
- block (depth): the calibration LM loss with the block skipped, and Block Influence, 1 - cos(block input,
  block output) per token (Men et al. 2024, https://arxiv.org/abs/2403.03853).

Every mean is over the tokens that `attention_mask` marks (all tokens without one).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..structured import head_geometry
from .layout import decoder_layout


@dataclass
class MinitronImportance:
    """What the calibration batches said about every prunable unit (higher: more important), per original layer."""

    neurons: list[torch.Tensor]  # [layer] -> (intermediate_size,)
    heads: list[torch.Tensor]  # [layer] -> (num_attention_heads,)
    kv_groups: list[torch.Tensor]  # [layer] -> (num_key_value_heads,): the sum of each group's query heads
    hidden: torch.Tensor  # (hidden_size,)
    lm_loss_without_layer: torch.Tensor  # (num_layers,): calibration loss with that block skipped
    block_influence: torch.Tensor  # (num_layers,)
    lm_loss: float  # the unpruned model's calibration loss
    tokens: int  # calibration tokens scored

    def layer_importance(self, measure: str) -> torch.Tensor:
        """Per block, higher = keep: the loss increase when it is skipped, or its Block Influence."""
        if measure == "lm_loss":
            return self.lm_loss_without_layer - self.lm_loss
        return self.block_influence

    def table(self) -> str:
        """One row per block: what skipping it costs, its Block Influence, and its mean head / neuron scores."""
        rows = [f"calibration LM loss {self.lm_loss:.4f} over {self.tokens} tokens; hidden channels: mean "
                f"{self.hidden.mean():.4g}, min {self.hidden.min():.4g}, max {self.hidden.max():.4g}",
                f"{'layer':>5} {'loss skipped':>12} {'block infl.':>11} {'head score':>10} {'neuron score':>12}"]
        for i in range(len(self.neurons)):
            rows.append(f"{i:>5} {self.lm_loss_without_layer[i]:>12.4f} {self.block_influence[i]:>11.4f} "
                        f"{self.heads[i].mean():>10.4g} {self.neurons[i].mean():>12.4g}")
        return "\n".join(rows)


def _token_mask(batch: dict, hidden: torch.Tensor) -> torch.Tensor:
    """(batch, seq) float mask of the scored tokens."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(hidden.shape[:2], device=hidden.device)
    return mask.to(hidden.device, torch.float32)


def _model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def _summed_nll(logits: torch.Tensor, inputs: dict) -> tuple[float, int]:
    """Next-token negative log-likelihood summed over the masked tokens of one batch, and their count."""
    targets = inputs["input_ids"][:, 1:]
    mask = _token_mask(inputs, inputs["input_ids"])[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum().item(), int(mask.sum().item())


def _mean(total: float, count: int) -> float:
    if count == 0:
        raise ValueError("the calibration batches hold no token to predict (each needs at least 2 tokens)")
    return total / count


def calibration_lm_loss(model, batches: list[dict]) -> tuple[float, int]:
    """Mean next-token cross-entropy over the masked tokens of `batches`, and how many tokens it averages."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            inputs = _model_inputs(batch, device)
            nll, predicted = _summed_nll(model(**inputs).logits, inputs)
            total, count = total + nll, count + predicted
    return _mean(total, count), count


class _SkippedBlock(torch.nn.Module):
    """Stands in for a decoder block: returns its input hidden states (the residual stream passes unchanged)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def skipped_block(model, index: int):
    """Run `model` with block `index` skipped (restored on exit)."""
    layout, _ = decoder_layout(model)
    layers = model.get_submodule(layout.layers)
    block = layers[index]
    layers[index] = _SkippedBlock()
    try:
        yield model
    finally:
        layers[index] = block


def activation_importance(model, batches: list[dict]) -> MinitronImportance:
    """Score every block, head, FFN neuron and embedding channel of a supported causal LM from `batches`
    (dicts with `input_ids` and optionally `attention_mask`). Forward passes only, over every batch: one with the
    hooks (which also gives the full model's loss), and one per block with that block skipped. The model is left
    as it was."""
    layout, block = decoder_layout(model)
    batches = list(batches)
    if not batches:
        raise ValueError("Minitron importance needs at least one calibration batch")
    layers = model.get_submodule(layout.layers)
    heads, kv_heads, head_dim = head_geometry(model.config)
    device = next(model.parameters()).device
    neurons = [None] * len(layers)
    head_norms = [torch.zeros(heads) for _ in layers]
    hidden = torch.zeros(model.config.hidden_size)
    cosine = torch.zeros(len(layers))
    state = {"mask": None, "tokens": 0}

    def masked_sum(x):  # x: (batch, seq, ...) -> (...) summed over the scored tokens
        mask = state["mask"].view(*state["mask"].shape, *([1] * (x.dim() - 2)))
        return (x.float() * mask).sum((0, 1)).cpu()

    def on_ffn_input(i):
        def hook(module, args):
            score = masked_sum(args[0].abs())
            neurons[i] = score if neurons[i] is None else neurons[i] + score
        return hook

    def on_attention_output(i):
        def hook(module, args):
            x = args[0]
            head_norms[i].add_(masked_sum(x.reshape(*x.shape[:2], heads, head_dim).float().norm(dim=-1)))
        return hook

    def on_norm_output(module, args, output):
        hidden.add_(masked_sum(output.abs()))

    def on_block(i):
        def hook(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)
            cosine[i] += masked_sum(cos).item()
        return hook

    was_training = model.training
    model.eval()  # no dropout: the scores measure the model as it is
    handles = []
    total_nll, predicted = 0.0, 0
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.get_submodule(block.ffn_out).register_forward_pre_hook(on_ffn_input(i)))
            handles.append(layer.get_submodule(block.out).register_forward_pre_hook(on_attention_output(i)))
            handles.append(layer.register_forward_hook(on_block(i), with_kwargs=True))
            handles.extend(layer.get_submodule(name).register_forward_hook(on_norm_output)
                           for name in layout.block_norms)
        handles.append(model.get_submodule(layout.final_norm).register_forward_hook(on_norm_output))
        # One pass with the hooks, then one per skipped block: the progress bar counts passes over the batches.
        with torch.no_grad(), tqdm(total=len(layers) + 1, desc="Minitron importance", unit="pass") as bar:
            for batch in batches:
                inputs = _model_inputs(batch, device)
                state["mask"] = _token_mask(inputs, inputs["input_ids"])
                state["tokens"] += int(state["mask"].sum().item())
                nll, count = _summed_nll(model(**inputs).logits, inputs)  # the full model's loss, in the same pass
                total_nll, predicted = total_nll + nll, predicted + count
            bar.update()
            for handle in handles:
                handle.remove()
            loss = _mean(total_nll, predicted)
            without = []
            for i in range(len(layers)):
                with skipped_block(model, i):
                    without.append(calibration_lm_loss(model, batches)[0])
                bar.update()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    tokens = state["tokens"]
    head_scores = [h / tokens for h in head_norms]
    group = heads // kv_heads
    return MinitronImportance(
        neurons=[n / tokens for n in neurons], heads=head_scores,
        kv_groups=[h.view(kv_heads, group).sum(1) for h in head_scores], hidden=hidden / tokens,
        lm_loss_without_layer=torch.tensor(without), block_influence=1 - cosine / tokens, lm_loss=loss,
        tokens=tokens)
