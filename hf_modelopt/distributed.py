"""Running a recipe in several processes (`accelerate launch`, torchrun): who writes, and when to wait.

Every process runs every stage (the Trainer inside a stage does the data-parallel work). Only the main
process writes into the output directory; the others write whatever a stage writes into a scratch
directory of their own, deleted at the end, so no two processes ever write the same file. Between stages
all processes wait for each other, so nobody reads a stage output before it is complete.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("hf_modelopt")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_index() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return process_index() == 0


def init_distributed() -> None:
    """Join the process group before any stage runs (launchers set WORLD_SIZE / RANK).

    On a machine without a GPU the processes run DDP on CPU over gloo: accelerate only does so when told
    `cpu=True`, so that is passed here (and `use_cpu` to every TrainingArguments, see `train.py`).
    """
    if world_size() <= 1:
        return
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if not is_main_process():
        logger.setLevel(logging.WARNING)  # one process tells the story
        return
    logger.info("distributed: %d processes, %s (backend %s)", state.num_processes, state.distributed_type.value,
                state.backend)
    requested = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(variable, "false").lower() == "true"]
    if requested and not torch.cuda.is_available():
        logger.warning("distributed: %s was requested but there is no GPU: accelerate runs plain data parallel "
                       "(DDP) on CPU instead; every process holds the whole model", requested[0])


def use_cpu() -> bool:
    """Whether Trainer must be told `use_cpu=True` (several CPU processes, or the launcher asked for CPU)."""
    import torch

    asked = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return asked or (world_size() > 1 and not torch.cuda.is_available())


def wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def is_sharded(tensor) -> bool:
    """A DTensor: a parameter sharded across processes (FSDP2 / tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(tensor, DTensor)


def full_state_dict(model) -> dict | None:
    """The model's state dict with whole tensors if any parameter is sharded (FSDP2), else None.

    Gathering is a collective: every process must call this at the same point, as every process saves
    each stage's model (the main one into the output folder, the others into their scratch folders).
    transformers' `save_pretrained` gathers only models it sharded itself; on a model sharded by
    accelerate / `fully_shard` it fails on the DTensors' storage.
    """
    if not any(is_sharded(p) for p in model.parameters()):
        return None
    return {name: (value.full_tensor() if is_sharded(value) else value).cpu()
            for name, value in model.state_dict().items()}


def _process_group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def share_of_work(items: list) -> list:
    """This process's share of `items` (every n-th of n processes, from its rank); all of them in one process.

    For independent trials (the sensitivity scan's units): each process runs its share on its own device,
    then `gather_work` gives every process all the results.
    """
    import torch.distributed as dist

    size = _process_group_size()
    return items if size == 1 else items[dist.get_rank()::size]


def gather_work(results: list) -> list:
    """Every process's `share_of_work` results, in the order of the items they were shared out from."""
    import torch.distributed as dist

    size = _process_group_size()
    if size == 1:
        return results
    shares: list[list | None] = [None] * size
    dist.all_gather_object(shares, results)
    # Process r had items r, r + n, r + 2n, ...: interleave the shares back into item order.
    return [shares[i % size][i // size] for i in range(sum(len(share) for share in shares))]
