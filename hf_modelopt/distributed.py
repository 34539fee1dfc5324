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
    logger.info("distributed: %d processes joined (backend %s)", state.num_processes, state.backend)


def report_training_mode(accelerator, stage_name: str) -> None:
    """Say how a training stage runs over several processes, and warn when it is not what the launch asked for.

    The Trainer's accelerator knows what really runs: on a machine without GPUs accelerate runs an FSDP config
    as plain data parallel without a word (a DeepSpeed config runs DeepSpeed on its CPU accelerator).
    """
    if accelerator.num_processes <= 1 or not is_main_process():
        return
    running = accelerator.distributed_type.value  # MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ...
    if running == "DEEPSPEED":
        running += f" ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    logger.info("%s: training in %d processes, %s", stage_name, accelerator.num_processes, running)
    requested = [mode for mode, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(variable, "false").lower() == "true"]
    if requested and not running.startswith(requested[0]):
        plain = running in ("MULTI_CPU", "MULTI_GPU")
        logger.warning("%s: the launch asked for %s, but accelerate runs %s%s", stage_name, requested[0], running,
                       " (plain data parallel: every process holds the whole model)" if plain else "")


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


def is_zero3_partitioned(tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter: between forwards each process holds only a flat slice of it (`ds_tensor`)."""
    return hasattr(tensor, "ds_id")


def whole_model(model):
    """`model` itself, or, when its weights are sharded over the processes (FSDP2, ZeRO-3), a plain copy of it
    with whole weights.

    A collective: every process calls it at the same point, when a training stage ends (`train_and_record`).
    What follows (evaluation, the main process saving alone, export) then needs no communication.
    transformers' `save_pretrained` gathers only models it sharded itself: on a model sharded by accelerate
    or `fully_shard` it fails on the DTensors' storage, and under ZeRO-3 it would save empty tensors.
    """
    if not any(is_sharded(p) or is_zero3_partitioned(p) for p in model.parameters()):
        return model
    state = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if is_zero3_partitioned(value):
            import deepspeed

            with deepspeed.zero.GatheredParameters([value]):  # one parameter at a time: little extra memory
                state[name] = value.detach().cpu().clone()
        else:
            state[name] = (value.full_tensor() if is_sharded(value) else value).detach().cpu()
    # FSDP2 changes the model's class to a subclass of its own; the copy is of the model class itself.
    from torch.distributed.fsdp import FSDPModule

    from .modeling import plain_copy

    model_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    return plain_copy(model, state, model_class).train(model.training)


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
