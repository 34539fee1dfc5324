"""Run under `accelerate launch` by tests/test_distributed.py: the recipe, then each process's weights.

Usage: accelerate launch ... tests/ddp_worker.py RECIPE OUTPUT
Runs the recipe with `run_recipe` (as the CLI does), then every process saves the weights and pruning
masks it ended with to OUTPUT/rank-N.safetensors, so the test can compare processes bit for bit.
"""

import sys

import torch
from safetensors.torch import save_file

import hf_modelopt.prune.callback as callback_module
from hf_modelopt.distributed import process_index
from hf_modelopt.pipeline import run_recipe
from hf_modelopt.recipe import load_recipe

seen = {}
original_train_end = callback_module.PruningCallback.on_train_end


def remember(self, args, state, control, model=None, **kwargs):
    original_train_end(self, args, state, control, model=model, **kwargs)
    seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seen["masks"] = {k: v.cpu() for k, v in self.masks.items()}


callback_module.PruningCallback.on_train_end = remember

recipe_path, output = sys.argv[1], sys.argv[2]
run_recipe(load_recipe(recipe_path), output)
tensors = {f"weight.{k}": v.contiguous() for k, v in seen["weights"].items()}
tensors.update({f"mask.{k}": v.to(torch.uint8).contiguous() for k, v in seen["masks"].items()})
save_file(tensors, f"{output}/rank-{process_index()}.safetensors")
