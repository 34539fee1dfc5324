"""Distillation losses: pure functions of tensors, each tested on its own.

- `soft_target_kl`: KL(teacher_T || student_T) * T², Hinton et al. 2015 (https://arxiv.org/abs/1503.02531).
- `sparse_soft_target_kl`: the same against a teacher distribution kept only on its top-k entries (the
  logit cache stores these); with k = number of classes it equals `soft_target_kl` exactly.
- `span_soft_target_kl`: the same for extractive QA, over the start and the end distributions (over positions).
- `hidden_mse`: MSE between (projected) student and teacher hidden states, TinyBERT
  (https://arxiv.org/abs/1909.10351).
- `hidden_cosine`: 1 - cos between hidden states, DistilBERT (https://arxiv.org/abs/1910.01108).
- `attention_kl` / `attention_mse`: between attention maps, MiniLM (https://arxiv.org/abs/2002.10957) /
  TinyBERT.

`mask` (batch, seq) selects the positions that count (padding excluded); every loss is a mean over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` (batch[, seq]) over the positions where `mask` is true."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _scaled_kl(log_p_teacher, log_p_student, temperature: float, mask) -> torch.Tensor:
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return _masked_mean(kl, mask) * temperature**2


def soft_target_kl(student_logits, teacher_logits, temperature: float = 1.0, mask=None) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) · T², averaged over examples (or masked token positions)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _scaled_kl(log_p_teacher, log_p_student, temperature, mask)


def top_k_logits(teacher_logits: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest teacher logits and their indices (all of them when k is None or too large)."""
    k = teacher_logits.size(-1) if k is None else min(k, teacher_logits.size(-1))
    values, indices = teacher_logits.float().topk(k, dim=-1)
    return values, indices


def sparse_soft_target_kl(student_logits, teacher_values, teacher_indices, temperature: float = 1.0,
                          mask=None) -> torch.Tensor:
    """`soft_target_kl` with the teacher known only on `teacher_indices` (renormalised over them)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices)
    log_p_teacher = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    return _scaled_kl(log_p_teacher, log_p_student, temperature, mask)


def span_soft_target_kl(student_start, student_end, teacher_start, teacher_end, temperature: float = 1.0,
                        mask=None) -> torch.Tensor:
    """`soft_target_kl` of the start and of the end distributions (batch, positions), averaged.

    `mask` (batch, positions) marks real tokens: padding positions are left out of both softmaxes.
    """
    def masked(logits):
        if mask is None:
            return logits.float()
        return logits.float().masked_fill(~mask.bool(), torch.finfo(torch.float32).min)

    start = soft_target_kl(masked(student_start), masked(teacher_start), temperature)
    end = soft_target_kl(masked(student_end), masked(teacher_end), temperature)
    return (start + end) / 2


def hidden_mse(student_hidden, teacher_hidden, projection: torch.nn.Module | None = None, mask=None):
    """Mean squared error per hidden unit between student (projected to the teacher's width) and teacher."""
    if projection is not None:
        student_hidden = projection(student_hidden)
    error = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    return _masked_mean(error, mask)


def hidden_cosine(student_hidden, teacher_hidden, projection: torch.nn.Module | None = None, mask=None):
    """1 - cosine similarity of hidden vectors, averaged over positions."""
    if projection is not None:
        student_hidden = projection(student_hidden)
    similarity = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return _masked_mean(1.0 - similarity, mask)


def attention_kl(student_attention, teacher_attention, mask=None, eps: float = 1e-12):
    """KL(teacher row || student row) of attention probabilities (batch, heads, query, key), per query.

    Heads must match in number (average or select heads first otherwise). Rows of padded queries are
    excluded by `mask` (batch, query).
    """
    teacher = teacher_attention.float().clamp_min(eps)
    student = student_attention.float().clamp_min(eps)
    kl = (teacher * (teacher.log() - student.log())).sum(-1).mean(1)  # (batch, query)
    return _masked_mean(kl, mask)


def attention_mse(student_attention, teacher_attention, mask=None):
    """MSE between attention probability maps, averaged over heads and keys, per query."""
    error = (student_attention.float() - teacher_attention.float()).pow(2).mean(-1).mean(1)
    return _masked_mean(error, mask)
