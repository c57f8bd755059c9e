import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vl_core.blend import ADAIN_MODES, BLEND_MODES, RAMP_SHAPES, adain, blend, style_delta, token_ramp

FAST = settings(max_examples=30, deadline=None)
DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def with_negative_zeros(x):
    x = x.clone()
    x.view(-1)[::3] = -0.0
    return x


shapes = dict(b=st.integers(1, 3), n=st.integers(1, 10), d=st.integers(1, 16), seed=st.integers(0, 10**6))


def bits_equal(a, b):
    """Bit-identical (so -0.0 and +0.0 differ): same dtype/shape and same raw integers."""
    ints = {4: torch.int32, 2: torch.int16, 8: torch.int64}
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(ints[a.element_size()]), b.contiguous().view(ints[b.element_size()])))


# ---------------------------------------------------------------- blend

@FAST
@given(mode=st.sampled_from(BLEND_MODES), dtype=st.sampled_from(DTYPES), vl_batch_one=st.booleans(),
       w=st.floats(-0.5, 1.5), **shapes)
def test_blend_shape_law(mode, dtype, vl_batch_one, w, b, n, d, seed):
    t = rand(b, n, d, seed=seed, dtype=dtype)
    v = rand(1 if vl_batch_one else b, n, d, seed=seed + 1, dtype=dtype)
    y = blend(t, v, w, mode)
    assert y.shape == t.shape and y.dtype == dtype and torch.isfinite(y).all()


@FAST
@given(mode=st.sampled_from(BLEND_MODES), dtype=st.sampled_from(DTYPES), **shapes)
def test_blend_weight_0_is_text_and_weight_1_is_vl_bit_identical(mode, dtype, b, n, d, seed):
    t = with_negative_zeros(rand(b, n, d, seed=seed, scale=30, dtype=dtype))
    v = with_negative_zeros(rand(b, n, d, seed=seed + 1, scale=30, dtype=dtype))
    assert bits_equal(blend(t, v, 0.0, mode), t)
    assert bits_equal(blend(t, v, 1.0, mode), v)
    assert bits_equal(blend(t, v, torch.tensor(0.0), mode), t)


@FAST
@given(mode=st.sampled_from(BLEND_MODES), **shapes)
def test_blend_per_token_weights_pin_endpoints_per_token(mode, b, n, d, seed):
    t = with_negative_zeros(rand(b, n, d, seed=seed, scale=30))
    v = rand(b, n, d, seed=seed + 1, scale=30)
    w = torch.tensor([(0.0, 1.0, 0.3)[i % 3] for i in range(n)])
    y = blend(t, v, w, mode)
    assert bits_equal(y[:, w == 0], t[:, w == 0])
    assert bits_equal(y[:, w == 1], v[:, w == 1])
    # a per-token weight equals the scalar blend on that token
    mid = w == 0.3
    torch.testing.assert_close(y[:, mid], blend(t, v, 0.3, mode)[:, mid])


@FAST
@given(w=st.floats(0, 1), **shapes)
def test_linear_blend_formula(w, b, n, d, seed):
    t, v = rand(b, n, d, seed=seed), rand(b, n, d, seed=seed + 1)
    torch.testing.assert_close(blend(t, v, w, "linear"), (1 - w) * t + w * v)


@FAST
@given(w=st.floats(0, 1), **shapes)
def test_slerp_interpolates_norm_linearly_and_angle_proportionally(w, b, n, d, seed):
    t = rand(b, n, max(d, 2), seed=seed, scale=10)
    v = rand(b, n, max(d, 2), seed=seed + 1, scale=3)
    y = blend(t, v, w, "slerp")
    nt, nv, ny = t.norm(dim=-1), v.norm(dim=-1), y.norm(dim=-1)
    cos = lambda a, c: ((a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1))).clamp(-1, 1)  # noqa: E731
    theta = torch.acos(cos(t, v))
    ok = (theta > 1e-2) & (theta < math.pi - 1e-2)  # away from the linear fallback
    torch.testing.assert_close(ny[ok], ((1 - w) * nt + w * nv)[ok], rtol=1e-4, atol=1e-4)
    if w > 0.01:
        torch.testing.assert_close(torch.acos(cos(t, y))[ok], (w * theta)[ok], rtol=1e-2, atol=2e-3)


def test_slerp_weight_1_within_tolerance_without_pinning():
    # just below 1 the endpoint is not pinned by torch.where, and the slerp formula itself lands within 1e-5 of v
    t, v = rand(2, 5, 16, seed=1), rand(2, 5, 16, seed=2)
    assert torch.tensor(1 - 1e-7) != 1
    torch.testing.assert_close(blend(t, v, 1 - 1e-7, "slerp"), v, rtol=1e-5, atol=1e-5)


def test_slerp_zero_vectors_and_parallel_vectors_no_nan():
    t = torch.zeros(1, 3, 8)
    v = rand(1, 3, 8, seed=3)
    v[0, 1] = 0.0
    for w in (0.0, 0.25, 0.5, 1.0):
        y = blend(t, v, w, "slerp")
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, blend(t, v, w, "linear"))  # zero vector → linear fallback
    # parallel (angle 0) and antipodal (angle π) fall back to linear, finite
    p = rand(1, 4, 8, seed=4)
    for other in (2.5 * p, -p):
        y = blend(p, other, 0.5, "slerp")
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, 0.5 * p + 0.5 * other)


def test_blend_errors_name_arguments():
    t = rand(1, 5, 2560)
    with pytest.raises(ValueError, match="VL width 4096 does not match text conditioning width 2560: use Qwen3-VL-4B"):
        blend(t, rand(1, 5, 4096), 0.5, "linear")
    with pytest.raises(ValueError, match="VL has 7 tokens but text conditioning has 5: match lengths first"):
        blend(t, rand(1, 7, 2560), 0.5, "slerp")
    with pytest.raises(ValueError, match=r"unknown blend mode 'nlerp': expected one of 'linear', 'slerp'"):
        blend(t, t, 0.5, "nlerp")
    with pytest.raises(ValueError, match=r"weight must be a number or a per-token tensor \[5\]"):
        blend(t, t, torch.ones(4), "linear")
    with pytest.raises(ValueError, match="weight contains 1 NaN/Inf"):
        blend(t, t, float("nan"), "linear")
    bad = t.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="VL contains 1 NaN/Inf .* upstream node"):
        blend(t, bad, 0.5, "linear")
    with pytest.raises(ValueError, match="text conditioning contains 1 NaN/Inf"):
        blend(bad, t, 0.5, "linear")
    with pytest.raises(ValueError, match="VL batch 2 does not match text conditioning batch 3"):
        blend(rand(3, 5, 8), rand(2, 5, 8), 0.5, "linear")


# ---------------------------------------------------------------- token_ramp

@FAST
@given(n=st.integers(1, 300), alpha=st.floats(-2, 2))
def test_token_ramp(n, alpha):
    c = token_ramp(n, alpha, "constant")
    assert c.shape == (n,) and torch.equal(c, torch.full((n,), alpha))
    g = token_ramp(n, alpha, "graduated")
    assert g.shape == (n,) and g.dtype == torch.float32
    torch.testing.assert_close(g, alpha * torch.arange(1, n + 1, dtype=torch.float32) / n)
    torch.testing.assert_close(g[-1], torch.tensor(alpha))
    if alpha > 1e-3 and n > 1:
        assert (g.diff() > 0).all()  # later tokens take more VL


def test_token_ramp_alpha_zero_feeds_blend_identity():
    t, v = rand(1, 6, 4, seed=1), rand(1, 6, 4, seed=2)
    for shape in RAMP_SHAPES:
        assert torch.equal(blend(t, v, token_ramp(6, 0.0, shape), "slerp"), t)


def test_token_ramp_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown ramp shape 'linear': expected one of 'constant', 'graduated'"):
        token_ramp(4, 0.5, "linear")
    with pytest.raises(ValueError, match=r"n \(token count\) must be an integer >= 1"):
        token_ramp(0, 0.5, "constant")
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        token_ramp(4, float("inf"), "constant")


# ---------------------------------------------------------------- style_delta

@FAST
@given(normalize=st.booleans(), dtype=st.sampled_from(DTYPES), strength=st.floats(-2, 2), **shapes)
def test_style_delta_shape_and_formula(normalize, dtype, strength, b, n, d, seed):
    t = rand(b, n, d, seed=seed, scale=5, dtype=dtype)
    s, z = rand(1, n, d, seed=seed + 1), rand(1, n, d, seed=seed + 2)
    y = style_delta(t, s, z, strength, normalize)
    assert y.shape == t.shape and y.dtype == dtype and torch.isfinite(y).all()
    if not normalize and dtype == torch.float32:
        torch.testing.assert_close(y, t + strength * (s - z))


@FAST
@given(normalize=st.booleans(), dtype=st.sampled_from(DTYPES), **shapes)
def test_style_delta_strength_0_is_bit_identical(normalize, dtype, b, n, d, seed):
    t = with_negative_zeros(rand(b, n, d, seed=seed, dtype=dtype))
    s, z = rand(b, n, d, seed=seed + 1, scale=100), rand(b, n, d, seed=seed + 2)
    assert bits_equal(style_delta(t, s, z, 0.0, normalize), t)


@FAST
@given(**shapes)
def test_style_delta_normalized_rms_matches_text(b, n, d, seed):
    t = rand(b, n, d, seed=seed, scale=7)
    s, z = rand(b, n, d, seed=seed + 1, scale=300), rand(b, n, d, seed=seed + 2, scale=300)
    added = style_delta(t, s, z, 1.0, True) - t
    rms = lambda x: x.square().mean(-1).sqrt().mean(-1)  # noqa: E731  per batch item
    torch.testing.assert_close(rms(added), rms(t), rtol=1e-4, atol=1e-4)


def test_style_delta_zero_delta_no_nan():
    t = rand(1, 4, 6)
    s = rand(1, 4, 6, seed=3)
    for normalize in (False, True):
        y = style_delta(t, s, s.clone(), 2.0, normalize)
        assert torch.isfinite(y).all() and torch.equal(y, t)
    assert torch.isfinite(style_delta(torch.zeros(1, 4, 6), s, -s, 1.0, True)).all()


def test_style_delta_errors():
    t = rand(1, 4, 6)
    with pytest.raises(ValueError, match="VL style width 5 does not match text conditioning width 6"):
        style_delta(t, rand(1, 4, 5), rand(1, 4, 6), 1.0, True)
    with pytest.raises(ValueError, match="VL neutral has 3 tokens but text conditioning has 4"):
        style_delta(t, rand(1, 4, 6), rand(1, 3, 6), 1.0, True)
    with pytest.raises(ValueError, match="strength contains 1 NaN/Inf"):
        style_delta(t, t, t, float("nan"), False)


# ---------------------------------------------------------------- adain

@FAST
@given(dtype=st.sampled_from(DTYPES), mode=st.sampled_from(ADAIN_MODES), **shapes)
def test_adain_weight_0_bit_identical(dtype, mode, b, n, d, seed):
    c = with_negative_zeros(rand(b, n, d, seed=seed, dtype=dtype))
    s = rand(b, n, d, seed=seed + 1, scale=9)
    y = adain(c, s, mode, weight=0.0)
    assert bits_equal(y, c)


@FAST
@given(b=st.integers(1, 3), n=st.integers(1, 10), d=st.integers(2, 16), seed=st.integers(0, 10**6))
def test_adain_per_token_matches_style_stats_per_token(b, n, d, seed):
    c = rand(b, n, d, seed=seed, scale=0.5) + 3 * torch.arange(d)  # per-token std bounded away from 0
    s = rand(b, n, d, seed=seed + 1, scale=9) - 2
    y = adain(c, s, "per_token")
    assert y.shape == c.shape
    torch.testing.assert_close(y.mean(-1), s.mean(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.std(-1, unbiased=False), s.std(-1, unbiased=False), rtol=1e-4, atol=1e-4)


@FAST
@given(b=st.integers(1, 3), n=st.integers(2, 10), m=st.integers(1, 20), d=st.integers(1, 16),
       style_batch_one=st.booleans(), seed=st.integers(0, 10**6))
def test_adain_per_dim_matches_style_stats_per_dim_with_other_length(b, n, m, d, style_batch_one, seed):
    c = rand(b, n, d, seed=seed, scale=0.5) + 3 * torch.arange(n).view(1, n, 1)  # per-dim std away from 0
    s = rand(1 if style_batch_one else b, m, d, seed=seed + 1, scale=9) - 2
    y = adain(c, s, "per_dim")
    assert y.shape == c.shape
    torch.testing.assert_close(y.mean(1), s.mean(1).expand(b, d), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.std(1, unbiased=False), s.std(1, unbiased=False).expand(b, d),
                               rtol=1e-4, atol=1e-4)


@FAST
@given(w=st.floats(0, 1), mode=st.sampled_from(ADAIN_MODES), **shapes)
def test_adain_weight_lerps(w, mode, b, n, d, seed):
    c, s = rand(b, n, d, seed=seed), rand(b, n, d, seed=seed + 1, scale=3)
    full = adain(c, s, mode, weight=1.0)
    torch.testing.assert_close(adain(c, s, mode, weight=w), (1 - w) * c + w * full)


@pytest.mark.parametrize("mode", ADAIN_MODES)
def test_adain_constant_content_no_nan(mode):
    c = torch.full((1, 4, 6), 2.0)
    s = rand(1, 4, 6, seed=1)
    y = adain(c, s, mode)
    assert torch.isfinite(y).all()
    axis = -1 if mode == "per_token" else 1
    torch.testing.assert_close(y.mean(axis), s.mean(axis))  # lands on the style mean
    assert torch.isfinite(adain(s, torch.zeros(1, 4, 6), mode)).all()


def test_adain_errors():
    c = rand(1, 4, 6)
    with pytest.raises(ValueError, match=r"unknown adain mode 'global': expected one of 'per_token', 'per_dim'"):
        adain(c, c, "global")
    with pytest.raises(ValueError, match="style has 5 tokens but content has 4"):
        adain(c, rand(1, 5, 6), "per_token")
    with pytest.raises(ValueError, match="style width 7 does not match content width 6"):
        adain(c, rand(1, 5, 7), "per_dim")
    bad = c.clone()
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="content contains 1 NaN/Inf"):
        adain(bad, c, "per_dim")
