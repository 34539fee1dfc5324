"""`DistillationTrainer`: a `transformers.Trainer` whose loss is the distillation loss. Nothing else changes."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from ..compat import require_support, require_task_support
from . import losses
from .config import DistillationConfig
from .placement import is_dispatched

PROJECTIONS_FILE = "distill_projections.safetensors"


def default_layer_map(student_layers: int, teacher_layers: int, copied_from: list[int] | None = None) -> dict[int, int]:
    """Student layer -> the teacher layer whose output it should reproduce.

    A student layer copied from teacher layer `copied_from[i]` stands in for the teacher's layers up to the
    next kept one, so it maps to the layer just before that (the last student layer to the last teacher
    layer): layers [0, 2, 4] of 6 map to {0: 1, 1: 3, 2: 5}. Otherwise layers are evenly spaced, last to last.
    """
    if copied_from is not None:
        ends = [nxt - 1 for nxt in copied_from[1:]] + [teacher_layers - 1]
        return {i: max(start, end) for i, (start, end) in enumerate(zip(copied_from, ends))}
    return {i: round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)}


def task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: bool | None = None) -> torch.Tensor:
    """CE over labelled examples (classification), tokens or next tokens (causal LM); -100 is ignored.

    `shift`: position t predicts label t + 1 (causal LM); default: for token-level (3-D) logits.
    """
    if logits.dim() == 3 if shift is None else shift:  # causal LM: position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.reshape(-1)
    if not (labels != -100).any():  # a batch of unlabelled transfer text only
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(labels.numel(), -1).float(), labels, ignore_index=-100)


def _one_per_example(inputs, labels):
    return None


def _labelled_tokens(inputs, labels):
    return labels != -100 if labels is not None else inputs.get("attention_mask")


def _real_tokens(inputs, labels):
    return inputs.get("attention_mask")


def _labelled_decoder_positions(inputs, labels):
    # (attention_mask is the encoder's: without labels every decoder position counts)
    return labels != -100 if labels is not None else None


@dataclass(frozen=True)
class LogitsComparison:
    """How the distillation loss reads one shape of logits (`Task.logits`)."""

    compared: Callable  # (inputs, labels) -> mask of the positions compared, or None (every one)
    span: bool = False  # start and end distributions over the positions (KD per distribution; CE: the model's loss)
    shifted: bool = False  # position t predicts label t + 1 (the task cross-entropy shifts the labels)


# Logits shape -> how KD and the task loss compare them: the trainer's one reading of `Task.logits`.
COMPARISONS: dict[str, LogitsComparison] = {
    "sequence": LogitsComparison(_one_per_example),
    "token": LogitsComparison(_labelled_tokens),  # label -100 (later sub-tokens) and padding excluded
    "span": LogitsComparison(_real_tokens, span=True),
    "decoder-token": LogitsComparison(_real_tokens, shifted=True),
    "seq2seq-token": LogitsComparison(_labelled_decoder_positions),
}


class _ZeroProjectionGradients(TrainerCallback):
    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.projections.zero_grad(set_to_none=True)


class DistillationTrainer(Trainer):
    """Trains `model` (the student) against a frozen `teacher` with the loss of a `DistillationConfig`.

    The teacher is put in eval mode, never receives gradients, runs under `torch.no_grad()`, is placed on
    the student's device(s) by accelerate and is not part of the student's checkpoints. Each loss term is
    logged on its own (`kd_loss`, `ce_loss`, `hidden_loss`, `cosine_loss`, `attention_loss`).
    Batches may carry `teacher_top_values` / `teacher_top_indices` (from a `TeacherLogitCache`): then the
    teacher does not run at all.

    `task` (a registered task name, default: from the student's class) says how logits are compared
    (`Task.logits`): per example; per token, over labelled tokens (label -100 and padding excluded); per
    position, start and end distributions over the real tokens; per decoder token, over real tokens; per
    decoder position of an encoder-decoder, over the labelled positions (both models get the same decoder
    inputs, made from the labels when the batch has none).

    Example:
        trainer = DistillationTrainer(model=student, teacher=teacher, distillation=DistillationConfig(ce_weight=0.5),
                                      args=TrainingArguments(...), train_dataset=..., data_collator=...)
    """

    def __init__(self, *args, teacher=None, distillation: DistillationConfig | None = None, layer_map=None,
                 task: str | None = None, **kwargs):
        from ..tasks import get_task, infer_task

        for checked in (kwargs.get("model", args[0] if args else None), teacher):
            if checked is not None:
                require_support("distillation", checked)
        super().__init__(*args, **kwargs)
        self.task = get_task(task or infer_task(self.model))
        self.distillation = config = distillation if distillation is not None else DistillationConfig()
        if teacher is None and config.needs_hidden_states:
            raise ValueError("hidden / cosine / attention losses compare the teacher's internals: pass teacher=")
        if config.needs_hidden_states:
            require_task_support("distillation of hidden states", self.task.name)
        student = self.model
        if layer_map is None and teacher is not None:
            layer_map = default_layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        self.layer_map = layer_map or {}
        self.teacher = None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            # A teacher spread over devices (`teacher_device_map`) stays where it is; accelerate's hooks move
            # the student's inputs to it and its outputs back.
            self.teacher = teacher if is_dispatched(teacher) else self.accelerator.prepare_model(
                teacher, evaluation_mode=True)
        # Widths differ: a learned projection per mapped layer (trained, never saved with the student).
        self.projections = torch.nn.ModuleDict()
        if teacher is not None and (config.hidden_weight or config.cosine_weight):
            s_width, t_width = student.config.hidden_size, teacher.config.hidden_size
            if s_width != t_width:
                self.projections = torch.nn.ModuleDict(
                    {str(i): torch.nn.Linear(s_width, t_width) for i in self.layer_map}
                ).to(self.args.device)
        # Trainer zeroes the gradients of the model only (`model.zero_grad()`); the projections' would add
        # up over all steps.
        self.add_callback(_ZeroProjectionGradients(self))
        # Our losses are means over the batch: let Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._loss_terms: dict[str, list[torch.Tensor]] = defaultdict(list)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if len(self.projections):
            optimizer.add_param_group({"params": list(self.projections.parameters()), "weight_decay": 0.0})
        return optimizer

    # The projections are trained with the student but are not part of it: checkpoints keep them next to
    # the optimizer state, so a resumed run continues with the same projections.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if len(self.projections) and self.args.should_save:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.projections.state_dict().items()},
                      os.path.join(output_dir, PROJECTIONS_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and len(self.projections):
            from safetensors.torch import load_file

            self.projections.load_state_dict(load_file(os.path.join(checkpoint, PROJECTIONS_FILE)))
        super()._load_optimizer_and_scheduler(checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.distillation
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        inputs.pop("example_index", None)
        cached = inputs.pop("teacher_top_values", None), inputs.pop("teacher_top_indices", None)
        need_hidden = bool(config.hidden_weight or config.cosine_weight)
        need_attention = bool(config.attention_weight)
        comparison = COMPARISONS[self.task.logits]
        if self.task.encoder_decoder and labels is not None and "decoder_input_ids" not in inputs:
            # Without labels the model would get no decoder inputs: make them as it would, once for both models.
            from ..tasks.seq2seq import decoder_inputs_from_labels

            inputs["decoder_input_ids"] = decoder_inputs_from_labels(labels, self.model.config)
        student = model(**inputs, output_hidden_states=need_hidden, output_attentions=need_attention)
        mask = comparison.compared(inputs, labels)

        teacher = None
        if cached[0] is None and (config.kd_weight or need_hidden or need_attention):
            with torch.no_grad():
                teacher = self.teacher(**inputs, output_hidden_states=need_hidden, output_attentions=need_attention)

        terms: dict[str, torch.Tensor] = {}
        if config.kd_weight:
            if comparison.span:  # (the cache refuses span tasks; top_k is for vocabularies, not positions)
                kd = losses.span_soft_target_kl(student.start_logits, student.end_logits, teacher.start_logits,
                                                teacher.end_logits, config.temperature, mask)
            elif cached[0] is None and config.top_k is None:  # the full distribution: no top-k sort per step
                kd = losses.soft_target_kl(student.logits, teacher.logits, config.temperature, mask)
            else:
                values, indices = cached if cached[0] is not None else losses.top_k_logits(teacher.logits, config.top_k)
                kd = losses.sparse_soft_target_kl(student.logits, values, indices, config.temperature, mask)
            terms["kd_loss"] = config.kd_weight * kd
        if config.ce_weight and comparison.span and student.loss is not None:  # start / end positions given
            terms["ce_loss"] = config.ce_weight * student.loss
        elif config.ce_weight and labels is not None:
            terms["ce_loss"] = config.ce_weight * task_cross_entropy(student.logits, labels,
                                                                     shift=comparison.shifted)
        token_mask = inputs.get("attention_mask")

        def mean_over_layers(layer_loss) -> torch.Tensor:
            return sum(layer_loss(s, t) for s, t in self.layer_map.items()) / len(self.layer_map)

        def projection(s_layer: int):
            return self.projections[str(s_layer)] if len(self.projections) else None

        # hidden_states[0] is the embedding output, so layer i's output is hidden_states[i + 1].
        if config.hidden_weight:
            terms["hidden_loss"] = config.hidden_weight * mean_over_layers(lambda s, t: losses.hidden_mse(
                student.hidden_states[s + 1], teacher.hidden_states[t + 1], projection(s), token_mask))
        if config.cosine_weight:
            terms["cosine_loss"] = config.cosine_weight * mean_over_layers(lambda s, t: losses.hidden_cosine(
                student.hidden_states[s + 1], teacher.hidden_states[t + 1], projection(s), token_mask))
        if config.attention_weight:
            attention = losses.attention_kl if config.attention_loss == "kl" else losses.attention_mse
            terms["attention_loss"] = config.attention_weight * mean_over_layers(lambda s, t: attention(
                student.attentions[s], teacher.attentions[t], token_mask))

        loss = sum(terms.values())
        for name, value in terms.items():
            self._loss_terms[name].append(value.detach())
        return (loss, student) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Training logs get each loss term averaged since the last log; evaluation logs pass through.
        if "loss" in logs and self._loss_terms:
            logs.update({name: torch.stack(v).mean().item() for name, v in self._loss_terms.items()})
            self._loss_terms.clear()
        super().log(logs, *args, **kwargs)
