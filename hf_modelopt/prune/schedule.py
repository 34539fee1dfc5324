"""Sparsity schedules: the target sparsity at each optimizer step. Pure functions, tested on their own."""

from __future__ import annotations


def cubic_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017, https://arxiv.org/abs/1710.01878): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n Δt))³.

    Sparsity rises fast while there are many redundant weights and slowly near the end. Before `start`
    it is 0 (nothing pruned yet); from `end` on it is `final`.
    """
    if step < start:
        return 0.0
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def linear_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Sparsity rising linearly from `initial` at `start` to `final` at `end`; 0 before `start`."""
    if step < start:
        return 0.0
    if step >= end:
        return final
    return initial + (final - initial) * (step - start) / (end - start)


def scheduled_sparsity(schedule, step: int, final: float) -> float:
    """Target sparsity at optimizer step `step` under a `ScheduleConfig`.

    The target only moves at update steps (`start_step + k * update_every`, and `end_step`), so masks are
    recomputed every `update_every` steps, not at every step.
    """
    if schedule.kind == "one_shot":
        return final if step >= schedule.start_step else 0.0
    end = schedule.end_step
    if schedule.start_step <= step < end:
        step = schedule.start_step + (step - schedule.start_step) // schedule.update_every * schedule.update_every
    curve = cubic_sparsity if schedule.kind == "cubic" else linear_sparsity
    return curve(step, schedule.start_step, end, schedule.initial_sparsity, final)
