"""Run with torchrun by tests/test_distributed.py: pruning masks on FSDP2-sharded parameters (CPU, gloo).

Shards a tiny BERT with `fully_shard`, prunes it with the functions `PruningCallback` uses, takes an
optimizer step, re-applies the masks and writes the gathered sparsity and a checksum per process; then
gathers the whole model in every process and saves it from the main one, as a training stage ends.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForSequenceClassification

from hf_modelopt.distributed import whole_model
from hf_modelopt.prune.masks import apply_masks_, full_weight, masks_from_scores, prunable_linears, sparsity_of
from hf_modelopt.stages import ModelState, save_model_state

folder, output = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
model = AutoModelForSequenceClassification.from_pretrained(folder)
for layer in model.bert.encoder.layer:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
modules = prunable_linears(model)
sharded = all(type(m.weight).__name__ == "DTensor" for m in modules.values())
masks = masks_from_scores({n: full_weight(m).abs() for n, m in modules.items()}, 0.7, "layer")
apply_masks_(modules, masks)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
ids = torch.randint(5, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
optimizer.step()
moved = sparsity_of(modules)  # Adam moved the pruned weights off zero
apply_masks_(modules, masks)
checksum = float(sum(full_weight(m).detach().double().abs().sum() for m in modules.values()))
with open(f"{output}/fsdp2-rank-{rank}.json", "w") as file:
    json.dump({"sharded": sharded, "sparsity": sparsity_of(modules), "after_step": moved, "checksum": checksum}, file)
# As a training stage ends: every process gathers the whole model, then the main process alone saves it.
model = whole_model(model)
if rank == 0:
    save_model_state(ModelState(model=model), Path(output) / "saved")
# Both processes are done before gloo is torn down: a process that destroys its group while the other still
# has one open can abort ("terminate called without an active exception"), as seen on a loaded machine.
dist.barrier()
dist.destroy_process_group()
