import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vl_core.schedule import (
    PRESETS,
    SCHEDULES,
    TimestepWindow,
    parse_block_weights,
    preset_blocks,
    schedule_value,
    segment,
    sigma_to_percent,
)

FAST = settings(max_examples=60, deadline=None)


def flow_shift(shift):
    """ComfyUI's ModelSamplingDiscreteFlow.percent_to_sigma: time_snr_shift(shift, 1 − p), with its end values."""
    def p2s(p):
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        t = 1.0 - p
        return shift * t / (1 + (shift - 1) * t)
    return p2s


def discrete_like(p):
    """A ModelSamplingDiscrete-like schedule: huge sentinel at 0, 0 at 1, exponential in between."""
    if p <= 0.0:
        return 999999999.9
    if p >= 1.0:
        return 0.0
    return math.exp(math.log(0.03) + (math.log(14.6) - math.log(0.03)) * (1.0 - p))


# --------------------------------------------------------------------------- block weights

def test_brief_example_on_30_blocks():
    w = parse_block_weights("0-9:1.0, 10-19:0.5, 27:0", 30)
    assert w == [1.0] * 10 + [0.5] * 10 + [0.0] * 10


def test_presets_on_z_image():
    assert preset_blocks("early", 30) == list(range(0, 10))
    assert preset_blocks("middle", 30) == list(range(10, 20))
    assert preset_blocks("late", 30) == list(range(20, 30))
    assert preset_blocks("all", 30) == list(range(30))
    assert parse_block_weights("late", 30) == [0.0] * 20 + [1.0] * 10
    assert parse_block_weights(" Early : 0.25 ", 30)[:10] == [0.25] * 10


@FAST
@given(st.integers(1, 80))
def test_presets_partition_the_blocks_in_order(n):
    parts = [preset_blocks(name, n) for name in ("early", "middle", "late")]
    flat = [i for p in parts for i in p]
    assert flat == list(range(n))
    for name, idx in zip(("early", "middle", "late"), parts):
        assert all(segment(i, n) == ("early", "middle", "late").index(name) for i in idx)
    if n >= 3:
        assert all(parts)


def test_later_entries_override_and_unnamed_blocks_are_zero():
    w = parse_block_weights("all:0.5; 27:0, 3-4:2", 30)
    assert w[27] == 0.0 and w[3] == w[4] == 2.0 and w[0] == 0.5 and sum(1 for x in w if x == 0.5) == 27
    assert parse_block_weights("5", 8) == [0, 0, 0, 0, 0, 1.0, 0, 0]
    assert parse_block_weights("1-2:-0.5", 4) == [0.0, -0.5, -0.5, 0.0]
    assert parse_block_weights("0 - 2 : 1e-1", 4) == [0.1, 0.1, 0.1, 0.0]


@pytest.mark.parametrize("spec, n, match", [
    ("30", 30, r"block 30 .* out of range: this model has 30 main blocks \(0-29\)"),
    ("25-31:1", 30, "out of range"),
    ("9-3", 30, "backwards: write 3-9"),
    ("", 30, "empty"),
    ("   ", 30, "empty"),
    ("early:abc", 30, "not a number"),
    ("early:nan", 30, "finite"),
    ("0:inf", 30, "finite"),
    ("-1", 30, "negative block indices"),
    ("top:1", 30, "unknown block preset 'top'"),
    ("1:2:3", 30, "not a number"),
    ("1.5", 30, "cannot read"),
])
def test_bad_specs_are_refused_with_the_fix(spec, n, match):
    with pytest.raises(ValueError, match=match):
        parse_block_weights(spec, n)


def test_bad_model_sizes_are_refused():
    for n in (0, -3, True, 2.0):
        with pytest.raises(ValueError, match="at least one main block"):
            parse_block_weights("all", n)
    with pytest.raises(ValueError, match="unknown block preset"):
        preset_blocks("tail", 10)


# --------------------------------------------------------------------------- schedules

def test_schedule_values():
    assert [schedule_value(s, 0.0) for s in SCHEDULES] == [1.0, 0.0, 1.0, 1.0]
    assert [schedule_value(s, 1.0) for s in SCHEDULES] == [1.0, 1.0, 0.0, pytest.approx(0.0, abs=1e-15)]
    assert schedule_value("cosine", 0.5) == pytest.approx(0.5)
    assert schedule_value("linear_up", 0.25) == 0.25 and schedule_value("linear_down", 0.25) == 0.75
    assert schedule_value("linear_up", -3) == 0.0 and schedule_value("linear_up", 7) == 1.0  # clamped
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_value("exp", 0.5)


@FAST
@given(st.floats(0, 1), st.floats(0, 1))
def test_schedules_are_monotone_and_bounded(a, b):
    lo, hi = min(a, b), max(a, b)
    assert schedule_value("linear_up", lo) <= schedule_value("linear_up", hi)
    assert schedule_value("linear_down", lo) >= schedule_value("linear_down", hi)
    assert schedule_value("cosine", lo) >= schedule_value("cosine", hi) - 1e-12
    for s in SCHEDULES:
        assert 0.0 <= schedule_value(s, a) <= 1.0
    assert schedule_value("cosine", a) == pytest.approx(1.0 - schedule_value("cosine", 1.0 - a), abs=1e-12)


@FAST
@given(st.floats(0.001, 0.999), st.sampled_from([1.0, 3.0, 6.0]))
def test_sigma_to_percent_inverts_flow_shift(p, shift):
    p2s = flow_shift(shift)
    assert sigma_to_percent(p2s(p), p2s) == pytest.approx(p, abs=1e-5)


@FAST
@given(st.floats(0.001, 0.999))
def test_sigma_to_percent_inverts_a_discrete_schedule(p):
    assert sigma_to_percent(discrete_like(p), discrete_like) == pytest.approx(p, abs=1e-5)


def test_sigma_to_percent_ends():
    p2s = flow_shift(3.0)
    assert sigma_to_percent(1.0, p2s) == 0.0 and sigma_to_percent(5.0, p2s) == 0.0
    assert sigma_to_percent(0.0, p2s) == 1.0


# --------------------------------------------------------------------------- window

def test_window_follows_comfy_convention():
    p2s = flow_shift(3.0)
    w = TimestepWindow(0.4, 0.7)
    s_start, s_end = w.bounds(p2s)
    assert s_start == p2s(0.4) and s_end == p2s(0.7)
    assert w.contains(s_start, p2s) and w.contains(s_end, p2s)  # inclusive, like ComfyUI's timestep ranges
    assert not w.contains(s_start + 1e-6, p2s) and not w.contains(s_end - 1e-6, p2s)
    assert w.factor(0.9, p2s) == 0.0 and w.factor(0.2, p2s) == 0.0 and w.factor(0.7, p2s) == 1.0


def test_full_window_covers_every_sigma():
    for p2s in (flow_shift(3.0), discrete_like):
        w = TimestepWindow(0.0, 1.0)
        assert all(w.factor(s, p2s) == 1.0 for s in (0.0, 1e-4, 0.5, 1.0, 14.6, 999.0))


@FAST
@given(st.floats(0.0, 0.45), st.floats(0.55, 1.0), st.floats(0.0, 1.0), st.sampled_from(SCHEDULES))
def test_window_factor_is_the_schedule_at_progress(start, end, p, name):
    p2s = flow_shift(3.0)
    w = TimestepWindow(start, end, name)
    sigma = p2s(p)
    f = w.factor(sigma, p2s)
    if not w.contains(sigma, p2s):
        assert f == 0.0
    else:
        u = min(1.0, max(0.0, (p - start) / (end - start)))
        assert f == pytest.approx(schedule_value(name, u), abs=1e-4)


@pytest.mark.parametrize("args, match", [((0.5, 0.5), "must be below"), ((0.8, 0.2), "must be below"),
                                         ((-0.1, 0.5), r"\[0, 1\]"), ((0.0, 1.5), r"\[0, 1\]"),
                                         ((0.0, 1.0, "steps"), "unknown schedule")])
def test_window_refuses_bad_settings(args, match):
    with pytest.raises(ValueError, match=match):
        TimestepWindow(*args)


def test_presets_constant_lists():
    assert PRESETS == ("all", "early", "middle", "late")
    assert SCHEDULES == ("constant", "linear_up", "linear_down", "cosine")
