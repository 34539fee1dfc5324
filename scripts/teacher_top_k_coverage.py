#!/usr/bin/env python
"""How much of a causal LM's held-out likelihood lies outside its top-k logits: what top-k KD (renormalised over the
k entries) leaves out.

On the recipe's evaluation windows (those of its `evaluate` stage, whole windows only: a shorter last window is
left out), with the recipe's model: perplexity, the share of next tokens among the k largest logits, the mean
probability outside them, and the share of the negative log-likelihood carried by the tokens outside them.

Usage: python scripts/teacher_top_k_coverage.py recipes/smollm2/minitron.yaml [--top-k 64]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--top-k", type=int, default=64)
    args = parser.parse_args()

    import torch

    from hf_modelopt.data import load_split
    from hf_modelopt.recipe import load_recipe
    from hf_modelopt.stages import ModelState, ensure_loaded
    from hf_modelopt.tasks.causal_lm import eval_token_ids, eval_windows

    recipe = load_recipe(args.recipe)
    state = ensure_loaded(ModelState(), recipe)
    model, data = state.model.eval(), recipe.data
    ids = eval_token_ids(load_split(data, "eval"), state.tokenizer, data)
    windows = torch.tensor([w for w in eval_windows(ids, data.eval_window) if len(w) == data.eval_window])
    nll, inside, outside_mass = [], [], []
    with torch.no_grad():
        for batch in windows.split(data.eval_batch_size):
            log_p = model(batch).logits[:, :-1].float().log_softmax(-1)
            labels = batch[:, 1:, None]
            top = log_p.topk(args.top_k, dim=-1)
            nll.append(-log_p.gather(-1, labels).flatten())
            inside.append((top.indices == labels).any(-1).flatten())
            outside_mass.append((1 - top.values.exp().sum(-1)).flatten())
    nll, inside, outside_mass = torch.cat(nll), torch.cat(inside), torch.cat(outside_mass)
    print(json.dumps({
        "recipe": args.recipe, "tokens": len(nll), "top_k": args.top_k,
        "perplexity": round(nll.mean().exp().item(), 2),
        "labels_in_top_k": round(inside.float().mean().item(), 4),
        "mean_probability_outside_top_k": round(outside_mass.mean().item(), 4),
        "nll_share_outside_top_k": round((nll * ~inside).sum().item() / nll.sum().item(), 4),
    }, indent=1))


if __name__ == "__main__":
    main()
