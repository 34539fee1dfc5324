"""Run with torchrun by tests/test_distributed.py: pruning masks on DeepSpeed ZeRO-3 partitioned parameters.

DeepSpeed's CPU accelerator over gloo. Partitions a tiny BERT with ZeRO-3, prunes it with the functions
`PruningCallback` uses, takes two optimizer steps with the masks applied after each (as the callback does),
and writes per process: the gathered sparsity, the sparsity before the last re-application, whether the
optimizer's fp32 copy of the pruned weights is zero, and a checksum. Then gathers the whole model in every
process and saves it from the main one, as a training stage ends.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param
from transformers import AutoModelForSequenceClassification

from hf_modelopt.distributed import is_zero3_partitioned, whole_model
from hf_modelopt.prune.masks import apply_masks_, full_weight, masks_from_scores, prunable_linears, sparsity_of
from hf_modelopt.stages import ModelState, save_model_state

folder, output = sys.argv[1], sys.argv[2]
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
model = AutoModelForSequenceClassification.from_pretrained(folder)
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                       config=config)
modules = prunable_linears(engine.module)
partitioned = all(is_zero3_partitioned(m.weight) and m.weight.numel() == 0 for m in modules.values())
masks = masks_from_scores({n: full_weight(m).abs() for n, m in modules.items()}, 0.7, "layer")
apply_masks_(modules, masks)
ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(rank))
for _ in range(2):
    loss = engine(input_ids=ids, labels=torch.tensor([0, 1])).loss
    engine.backward(loss)
    engine.step()
    moved = sparsity_of(modules)  # Adam moved the pruned weights off zero
    apply_masks_(modules, masks)
masters_zero = True
for name, module in modules.items():
    weight, master = module.weight, safe_get_local_fp32_param(module.weight)
    start = dist.get_rank(group=weight.ds_process_group) * weight.ds_tensor.numel()
    dropped = ~masks[name].flatten()[start : start + master.numel()]
    masters_zero &= bool((master.flatten()[: dropped.numel()][dropped] == 0).all())
checksum = float(sum(full_weight(m).double().abs().sum() for m in modules.values()))
with open(f"{output}/zero3-rank-{rank}.json", "w") as file:
    json.dump({"partitioned": partitioned, "sparsity": sparsity_of(modules), "after_step": moved,
               "masters_zero": masters_zero, "checksum": checksum}, file)
whole = whole_model(engine.module)
if rank == 0:
    save_model_state(ModelState(model=whole), Path(output) / "saved")
dist.barrier()  # both processes are done before gloo is torn down
dist.destroy_process_group()
