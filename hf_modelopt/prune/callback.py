"""`PruningCallback`: gradual unstructured pruning of a model while a `transformers.Trainer` trains it."""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback

from ..compat import require_support
from ..distributed import is_sharded, is_zero3_partitioned
from .config import PruningConfig
from .masks import (
    apply_masks_,
    block_parameters_report,
    full_weight,
    masks_from_scores,
    prunable_linears,
    sparsity_of,
    weight_grad,
    weight_numel,
)
from .schedule import scheduled_sparsity

logger = logging.getLogger("hf_modelopt")

# Written into every Trainer checkpoint folder beside the weights, read back on resume.
STATE_FILE = "pruning_state.safetensors"


class PruningCallback(TrainerCallback):
    """Raises the sparsity of the targeted Linear weights along `config.schedule` while training.

    Masks are recomputed at update steps (from |W|, or from the accumulated movement score -Σ W·∂L/∂W)
    and applied after every optimizer step, so pruned weights stay exactly zero whatever the optimizer
    does (momentum, weight decay), with gradient accumulation (masks act on optimizer steps) and mixed
    precision (they act on the parameters themselves). Masks and movement scores are saved in each
    checkpoint and restored when training resumes from it. The measured sparsity is appended to the
    Trainer's log history at every update (`{"step", "target_sparsity", "sparsity"}`).

    Example:
        trainer = Trainer(model, args, train_dataset=..., callbacks=[PruningCallback(PruningConfig(sparsity=0.9))])
    """

    def __init__(self, config: PruningConfig):
        self.config = config
        self.schedule = config.schedule.model_copy()
        self.modules: dict[str, torch.nn.Module] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.movement: dict[str, torch.Tensor] = {}
        self.target = 0.0  # the sparsity the current masks were computed for
        self.model = None

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        require_support("gradual pruning", model)
        self.model = model  # for the log's sparsity over every parameter of the blocks
        self.modules = prunable_linears(model, self.config.targets, self.config.exclude)
        if self.schedule.kind != "one_shot" and self.schedule.end_step is None:
            # Default: reach the final sparsity after two thirds of training, recover during the last third.
            self.schedule.end_step = max(self.schedule.start_step + 1, round(state.max_steps * 2 / 3))
        if self.config.method == "movement":
            if any(is_zero3_partitioned(m.weight) for m in self.modules.values()):
                # Its scores need each weight and its gradient whole at every step; ZeRO-3 keeps slices of both.
                raise ValueError("movement pruning does not run under DeepSpeed ZeRO-3; use method: magnitude, or "
                                 "FSDP2 (recipes/accelerate/fsdp2.yaml) or ZeRO-2")
            self.movement = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in self.modules.items()}
        if state.global_step > 0:
            self._restore(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            apply_masks_(self.modules, self.masks)
        self._update(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.movement:  # gradients of this optimizer step (accumulated, clipped) are complete here
            with torch.no_grad():
                for name, module in self.modules.items():
                    grad = weight_grad(module)
                    if grad is not None:
                        self.movement[name] -= (module.weight * grad).float()

    def on_optimizer_step(self, args, state, control, **kwargs):
        apply_masks_(self.modules, self.masks)

    def on_step_end(self, args, state, control, **kwargs):
        self._update(state)

    def on_train_end(self, args, state, control, **kwargs):
        from ..interrupt import stop_requested

        if stop_requested():  # interrupted: the checkpoint holds the schedule position; resuming continues it
            return
        final = self.config.sparsity
        if self.target < final:  # training stopped before the schedule ended: the output still gets the target
            logger.warning("pruning: training ended at step %d before the schedule reached %.0f %% (end_step %s); "
                           "pruning the rest in one shot", state.global_step, final * 100, self.schedule.end_step)
            self._prune_to(final, state)

    def on_save(self, args, state, control, **kwargs):
        from safetensors.torch import save_file

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        # The masks are the same in every process; the main one writes them, beside the weights it wrote.
        if state.is_world_process_zero and os.path.isdir(folder) and self.masks:
            tensors = {f"mask.{n}": m.cpu().contiguous() for n, m in self.masks.items()}
            tensors.update({f"movement.{n}": (s.full_tensor() if is_sharded(s) else s).cpu().contiguous()
                            for n, s in self.movement.items()})
            save_file(tensors, os.path.join(folder, STATE_FILE), metadata={"target": repr(self.target)})

    # ------------------------------------------------------------------ internals

    def _update(self, state) -> None:
        target = scheduled_sparsity(self.schedule, state.global_step, self.config.sparsity)
        if target > self.target:
            self._prune_to(target, state)

    def _prune_to(self, target: float, state) -> None:
        if self.config.method == "movement" and state.global_step > 0:
            scores = {n: s.full_tensor() if is_sharded(s) else s for n, s in self.movement.items()}
        else:  # magnitude (movement has no signal before the first step: start from magnitude)
            scores = {n: full_weight(m).abs() for n, m in self.modules.items()}
        self.masks = masks_from_scores(scores, target, self.config.scope, previous=self.masks or None)
        apply_masks_(self.modules, self.masks)
        previous, self.target = self.target, target
        measured = sparsity_of(self.modules)
        entry = {"step": state.global_step, "target_sparsity": round(target, 6), "sparsity": round(measured, 6)}
        if self.model is not None:  # zeros over every block parameter: what the targets leave out shows here
            entry["block_sparsity"] = round(block_parameters_report(self.model, self.modules)["block_sparsity"], 6)
        state.log_history.append(entry)
        if int(target * 20) > int(previous * 20) or target >= self.config.sparsity:  # every 5 points
            logger.info("pruning: step %d, sparsity %.1f %% of %d targeted weights (target %.1f %%)",
                        state.global_step, measured * 100, sum(weight_numel(m) for m in self.modules.values()),
                        target * 100)

    def _restore(self, checkpoint: str) -> None:
        from safetensors import safe_open

        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            # Not our checkpoint layout: the loaded weights still carry the zeros of the pruned positions.
            self.masks = {n: full_weight(m) != 0 for n, m in self.modules.items()}
            self.target = sparsity_of(self.modules)
            logger.warning("pruning: no %s in %s; masks rebuilt from the zeros of the weights", STATE_FILE, checkpoint)
            return
        with safe_open(path, framework="pt") as file:
            self.target = float(file.metadata()["target"])
            self.masks = {n: file.get_tensor(f"mask.{n}") for n in self.modules}
            for name, current in self.movement.items():
                loaded = file.get_tensor(f"movement.{name}")
                if is_sharded(current):
                    from torch.distributed.tensor import distribute_tensor

                    loaded = distribute_tensor(loaded, current.device_mesh, current.placements)
                self.movement[name] = loaded
        logger.info("pruning: masks and schedule position restored from %s (sparsity %.1f %%)", checkpoint,
                    self.target * 100)
