"""Run by tests/test_distributed.py, alone or with torchrun: the sensitivity scan over one or two processes.

Each process writes OUTPUT/sensitivity-rank-N.json: the results it ends with (all units, gathered) and the
layers it quantized itself (seen by wrapping the scan's fake quantization).
"""

import json
import os
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_modelopt.quant.sensitivity as sensitivity

quantized = []
fake_quantize_weight = sensitivity.fake_quantize_weight


def recording(weight, method):
    quantized.append(weight.data_ptr())
    return fake_quantize_weight(weight, method)


sensitivity.fake_quantize_weight = recording

folder, output = sys.argv[1], sys.argv[2]
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
encoded = tokenizer(["the cat sat on the mat and looked at the dog", "a quick brown fox jumps"] * 2,
                    padding=True, return_tensors="pt")
batches = [{**encoded, "labels": encoded["input_ids"]}]
candidates = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
results = sensitivity.sensitivity_scan(model, batches, "nf4", candidates, "layer")
names = {module.weight.data_ptr(): name for name, module in model.named_modules() if name in candidates}
measured = [names[pointer] for pointer in quantized]
with open(f"{output}/sensitivity-rank-{rank}.json", "w") as file:
    json.dump({"results": [asdict(r) for r in results], "measured": measured}, file)
if dist.is_initialized():
    dist.barrier()  # nobody tears the group down while the other still gathers
    dist.destroy_process_group()
