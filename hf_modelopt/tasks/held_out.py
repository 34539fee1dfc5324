"""Held-out perplexity during training: the curve of a causal LM's perplexity against the tokens it trained on.

(Its own module: it imports transformers' `TrainerCallback`, which `tasks.causal_lm` does not need at import.)
"""

from __future__ import annotations

from transformers import TrainerCallback

from .causal_lm import evaluate_perplexity

CURVE_KEY = "held_out_perplexity"  # the log-history key of the curve's points (with "tokens_trained")


def tokens_trained(args, steps: int, block_length: int) -> int:
    """Tokens a causal LM trained on in `steps` optimizer steps of `args` (`TrainingArguments`): steps x sequences per
    step (every process) x block length (the causal-LM training blocks are full, unpadded)."""
    sequences = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return steps * sequences * block_length


class HeldOutPerplexityCallback(TrainerCallback):
    """Measure `evaluate_perplexity` on held-out token ids before the first step, every `every_steps` optimizer steps
    and after the last, into the trainer's log history as `held_out_perplexity` with `tokens_trained`.

    `block_length` is the length of every training block (`tokens_trained`). Every process measures on the model it
    holds (an FSDP-sharded model needs all of them for a forward)."""

    def __init__(self, token_ids: list[int], window: int, batch_size: int, every_steps: int, block_length: int):
        if every_steps < 1:
            raise ValueError(f"every_steps must be at least 1, got {every_steps}")
        self.token_ids, self.window, self.batch_size = token_ids, window, batch_size
        self.every_steps, self.block_length = every_steps, block_length

    def measure(self, args, state, model) -> None:
        was_training = model.training
        perplexity = evaluate_perplexity(model, self.token_ids, self.window, self.batch_size)["perplexity"]
        model.train(was_training)
        state.log_history.append({"step": state.global_step, CURVE_KEY: perplexity,
                                  "tokens_trained": tokens_trained(args, state.global_step, self.block_length)})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # (a resumed run's history already holds its first point)
            self.measure(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_steps == 0 or state.global_step == state.max_steps:
            self.measure(args, state, model)


def perplexity_curve(log_history: list[dict]) -> list[dict]:
    """The curve's points in a trainer's log history: step, tokens trained, held-out perplexity."""
    return [{"step": e["step"], "tokens_trained": e["tokens_trained"], CURVE_KEY: e[CURVE_KEY]}
            for e in log_history if CURVE_KEY in e]
