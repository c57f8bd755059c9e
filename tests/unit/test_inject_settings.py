"""InjectionSettings: one validated value per node application (the node's messages, the bounds of issue 8)."""
import math

import pytest

from vl_core import schedule
from vl_core.inject_settings import MAX_BLOCK_SCALE, InjectionSettings, MethodTraits

ATTN = MethodTraits("extra_attention")
CAPTION = MethodTraits("caption_stream", caption_stream=True)
CONCAT = MethodTraits("concat", log_strength=True)
REFERENCE = MethodTraits("reference_attention", attention=True, regional=True)


def settings(method=ATTN, num_blocks=30, **kw):
    return InjectionSettings(method=method, num_blocks=num_blocks, **kw)


def test_defaults_are_the_nodes_and_derive_scale_and_window():
    s = settings(strength=0.5, block_weights="0-9:1.0, 10-19:0.5")
    assert (s.caption_mode, s.start_percent, s.end_percent, s.schedule, s.apply_to, s.token_budget, s.vl_rope) == \
        ("lerp", 0.0, 1.0, "constant", "cond_only", 256, "none")
    assert s.block_scale == tuple([0.5] * 10 + [0.25] * 10 + [0.0] * 10)
    assert isinstance(s.window, schedule.TimestepWindow) and s.always_on
    with pytest.raises(AttributeError):
        s.strength = 1.0  # frozen


@pytest.mark.parametrize("kw, match", [
    (dict(strength=4.0, block_weights="all:1e308"), r"strength 4.0 × block_weights 'all:1e308'.*at most 16"),
    (dict(strength=4.0, block_weights="0:1e308"), "block 0 a scale of inf"),
    (dict(strength=2.0, block_weights="3:8.5"), "block_weights '3:8.5' gives block 3"),
    (dict(strength=float("nan")), "strength must be finite"),
    (dict(strength="x"), "strength must be a finite number"),
    (dict(start_percent=float("nan")), "start_percent must be finite"),
    (dict(end_percent=float("inf")), "end_percent must be finite"),
    (dict(token_budget=float("nan")), "token_budget must be an integer"),
    (dict(token_budget=-1), "token_budget must be an integer"),
    (dict(token_budget=2.5), "token_budget must be an integer"),
    (dict(caption_mode="mix"), "unknown caption_mode 'mix'"),
    (dict(apply_to="neg"), "unknown apply_to 'neg'"),
    (dict(vl_rope="full"), "unknown vl_rope 'full'"),
    (dict(schedule="exp"), "unknown schedule 'exp'"),
    (dict(start_percent=0.6, end_percent=0.6), "must be below end_percent"),
    (dict(block_weights="30"), "30 main blocks"),
    (dict(kv_scale="k"), "unknown kv_scale 'k'"),
    (dict(share="mix"), "unknown share 'mix'"),
    (dict(reference_noise="noisy"), "unknown reference_noise 'noisy'"),
    (dict(negative_weight=float("nan")), "negative_weight must be finite"),
])
def test_bad_settings_name_their_input(kw, match):
    with pytest.raises(ValueError, match=match):
        settings(**kw)


def test_the_scale_bound_is_inclusive_and_applies_to_every_method():
    assert settings(strength=4.0, block_weights=f"all:{MAX_BLOCK_SCALE / 4}").block_scale[0] == MAX_BLOCK_SCALE
    assert settings(strength=-2.0, block_weights="all:8").block_scale[0] == -MAX_BLOCK_SCALE
    for method in (ATTN, CAPTION, CONCAT):
        with pytest.raises(ValueError, match="at most"):
            settings(method, strength=4.0, block_weights="all:4.5")


def test_caption_stream_never_weights_the_last_block():
    """Z-Image drops the caption after its last block: presets and ranges skip it, a spec naming only it is refused."""
    for spec in ("all", "late", "20-29", "29:1, 5:0.5"):
        s = settings(CAPTION, block_weights=spec)
        assert s.block_scale[-1] == 0.0 and any(s.block_scale), spec
    assert settings(CAPTION, block_weights="all").block_scale == tuple([0.5] * 29 + [0.0])
    assert settings(ATTN, block_weights="all").block_scale == tuple([0.5] * 30)  # attention on block 29 acts
    for spec, n in (("29", 30), ("late", 4), ("all:0, 29:2", 30)):
        with pytest.raises(ValueError, match=r"only to the\s+last block") as e:
            settings(CAPTION, num_blocks=n, block_weights=spec)
        assert "block_weights" in str(e.value) and "caption_stream" in str(e.value)


def test_strength_zero_is_valid_and_acts_nowhere():
    for method in (ATTN, CAPTION, CONCAT, REFERENCE):
        for kw in (dict(strength=0.0), dict(block_weights="all:0"), dict(strength=0.7, block_weights="0-29:0")):
            s = settings(method, **kw)
            assert not s.acts and not any(s.block_scale), (method.name, kw)
    assert settings(ATTN, strength=0.1).acts


def test_log_strength_methods_refuse_a_negative_scale():
    """concat and share=joint use w as log(w): a negative w has no log."""
    with pytest.raises(ValueError, match="concat uses strength × block weight as a log-strength"):
        settings(CONCAT, strength=-0.5)
    with pytest.raises(ValueError, match="share=joint"):
        settings(REFERENCE, strength=-0.5, share="joint")
    assert settings(REFERENCE, strength=-0.5, share="add").block_scale[0] == -0.5  # add: a negative pushes away
    assert settings(ATTN, strength=-0.5, share="add").acts
    assert settings(CONCAT, schedule="cosine").log_strength and not settings(CONCAT, schedule="cosine").always_on


def test_step_factor_is_window_times_schedule_for_every_method():
    def p2s(p):
        return 1.0 - p

    for method in (ATTN, CONCAT):
        s = settings(method, start_percent=0.2, end_percent=0.8, schedule="linear_down")
        assert s.step_factor(0.9, p2s) == 0.0
        assert s.step_factor(0.5, p2s) == pytest.approx(0.5, abs=1e-4)
        assert math.isclose(s.step_factor(0.79, p2s), 1 - (0.21 - 0.2) / 0.6, abs_tol=1e-4)
