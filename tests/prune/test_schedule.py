import pytest
from hypothesis import given
from hypothesis import strategies as st

from hf_modelopt.prune.config import ScheduleConfig
from hf_modelopt.prune.schedule import cubic_sparsity, linear_sparsity, scheduled_sparsity


def test_cubic_matches_zhu_and_gupta():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n Δt))^3 with s_i = 0, s_f = 0.9, t0 = 10, n Δt = 100
    assert cubic_sparsity(9, 10, 110, 0.0, 0.9) == 0.0
    assert cubic_sparsity(10, 10, 110, 0.0, 0.9) == 0.0
    assert cubic_sparsity(60, 10, 110, 0.0, 0.9) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert cubic_sparsity(110, 10, 110, 0.0, 0.9) == 0.9
    assert cubic_sparsity(500, 10, 110, 0.0, 0.9) == 0.9
    assert linear_sparsity(60, 10, 110, 0.2, 0.8) == pytest.approx(0.5)


def test_masks_move_only_at_update_steps():
    schedule = ScheduleConfig(kind="cubic", start_step=0, end_step=100, update_every=10)
    values = [scheduled_sparsity(schedule, t, 0.9) for t in range(0, 101)]
    assert values[1:10] == [values[0]] * 9 and values[10] > values[9]
    assert values[100] == 0.9
    assert scheduled_sparsity(ScheduleConfig(kind="one_shot", start_step=5), 4, 0.5) == 0.0
    assert scheduled_sparsity(ScheduleConfig(kind="one_shot", start_step=5), 5, 0.5) == 0.5


@given(start=st.integers(0, 1000), length=st.integers(1, 1000), every=st.integers(1, 50),
       initial=st.floats(0, 0.5), final=st.floats(0.5, 0.99), kind=st.sampled_from(["cubic", "linear"]))
def test_schedule_is_monotone_bounded_and_ends_at_the_target(start, length, every, initial, final, kind):
    schedule = ScheduleConfig(kind=kind, start_step=start, end_step=start + length, update_every=every,
                              initial_sparsity=initial)
    values = [scheduled_sparsity(schedule, t, final) for t in range(0, start + length + 3)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert all(0.0 <= v <= final + 1e-12 for v in values)
    assert values[start + length] == final
    assert values[start - 1] == 0.0 if start else values[0] == pytest.approx(initial)  # s_f + (s_i - s_f) rounds


def test_end_before_start_is_refused():
    with pytest.raises(ValueError, match="end_step"):
        ScheduleConfig(start_step=100, end_step=50)
