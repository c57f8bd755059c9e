import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vl_core.normalize import NORMALIZE_METHODS, global_moments, normalize_to_reference, rms_std
from vl_core.stats import DimStats, dim_stats

FAST = settings(max_examples=30, deadline=None)


def rand(*shape, seed=0, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + shift


def spread(b, n, d, seed):
    """Random x [b, n, d] whose per-dim std is bounded away from 0 (eps then costs < 1e-6 relative)."""
    return rand(b, n, d, seed=seed, scale=5, shift=-7) + 30 * torch.arange(n).view(1, n, 1)


def ref_stats(d, seed):
    g = torch.Generator().manual_seed(seed)
    return DimStats(mean=torch.randn(d, generator=g) * 2, std=torch.rand(d, generator=g) * 3 + 0.1, count=100)


shapes = dict(b=st.integers(1, 3), n=st.integers(2, 12), d=st.integers(1, 16), seed=st.integers(0, 10**6))


@FAST
@given(method=st.sampled_from(NORMALIZE_METHODS), **shapes)
def test_shape_and_dtype_preserved(method, b, n, d, seed):
    x = rand(b, n, d, seed=seed)
    for dtype in (torch.float32, torch.bfloat16):
        y = normalize_to_reference(x.to(dtype), ref_stats(d, seed), method)
        assert y.shape == x.shape and y.dtype == dtype


@FAST
@given(**shapes)
def test_per_dim_matches_reference_mean_and_std(b, n, d, seed):
    x = spread(b, n, d, seed)
    ref = ref_stats(d, seed + 1)
    s = dim_stats(normalize_to_reference(x, ref, "per_dim"))
    torch.testing.assert_close(s.mean, ref.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.std, ref.std, rtol=1e-4, atol=1e-4)


@FAST
@given(**shapes)
def test_global_matches_scalar_mean_and_std(b, n, d, seed):
    x = spread(b, n, d, seed)
    ref = ref_stats(d, seed + 1)
    y = normalize_to_reference(x, ref, "global")
    r_mean, r_std = global_moments(ref)
    torch.testing.assert_close(y.mean(), r_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.std(unbiased=False), r_std, rtol=1e-4, atol=1e-4)
    # a single affine map: per-dim std ratios of x are kept
    sx, sy = dim_stats(x), dim_stats(y)
    torch.testing.assert_close(sy.std / r_std, sx.std / x.std(unbiased=False), rtol=1e-3, atol=1e-5)


def test_global_reference_is_pooled_std_of_all_elements():
    # global_moments(dim_stats(z)) must be the plain scalar mean/std of z (law of total variance)
    z = rand(2, 50, 6, seed=4) * torch.arange(1.0, 7.0) + torch.arange(6.0)
    m, s = global_moments(dim_stats(z))
    torch.testing.assert_close(m, z.mean())
    torch.testing.assert_close(s, z.std(unbiased=False))


@FAST
@given(**shapes)
def test_hybrid_matches_per_dim_mean_and_rms_std(b, n, d, seed):
    x = spread(b, n, d, seed) * torch.linspace(0.1, 3, d)
    ref = ref_stats(d, seed + 1)
    y = normalize_to_reference(x, ref, "hybrid")
    sx, sy = dim_stats(x), dim_stats(y)
    torch.testing.assert_close(sy.mean, ref.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rms_std(sy), rms_std(ref), rtol=1e-4, atol=1e-4)
    # one global std factor: relative loudness of dims is preserved
    torch.testing.assert_close(sy.std * rms_std(sx), sx.std * rms_std(sy), rtol=1e-3, atol=1e-3)


def test_none_is_identity():
    x = rand(1, 4, 3)
    assert normalize_to_reference(x, ref_stats(3, 0), "none") is x


@pytest.mark.parametrize("method", NORMALIZE_METHODS)
def test_constant_input_gives_no_nan(method):
    x = torch.full((2, 5, 4), 3.0)
    y = normalize_to_reference(x, ref_stats(4, 0), method)
    assert torch.isfinite(y).all()
    zero_ref = DimStats(torch.zeros(4), torch.zeros(4), 1)
    assert torch.isfinite(normalize_to_reference(rand(1, 5, 4), zero_ref, method)).all()


def test_per_dim_constant_input_lands_on_reference_mean():
    ref = ref_stats(4, 0)
    y = normalize_to_reference(torch.full((1, 5, 4), 3.0), ref, "per_dim")
    torch.testing.assert_close(y, ref.mean.expand(1, 5, 4))


def test_explicit_x_stats_are_used():
    # stats taken on a subset of tokens (e.g. image tokens only) drive the map for all tokens
    x = rand(1, 10, 3, seed=2, scale=5)
    mask = torch.arange(10) < 4
    ref = ref_stats(3, 1)
    y = normalize_to_reference(x, ref, "per_dim", x_stats=dim_stats(x, mask))
    s = dim_stats(y, mask)
    torch.testing.assert_close(s.mean, ref.mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.std, ref.std, rtol=1e-4, atol=1e-4)


def test_bad_arguments_raise():
    x = rand(1, 4, 3)
    with pytest.raises(ValueError, match=r"unknown normalize method 'zscore': expected one of 'none', 'global', "
                                         r"'per_dim', 'hybrid'"):
        normalize_to_reference(x, ref_stats(3, 0), "zscore")
    with pytest.raises(ValueError, match="x width 3 does not match reference stats width 5"):
        normalize_to_reference(x, ref_stats(5, 0), "per_dim")
    with pytest.raises(ValueError, match="x width 3 does not match x_stats width 4"):
        normalize_to_reference(x, ref_stats(3, 0), "per_dim", x_stats=ref_stats(4, 0))
    x[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
        normalize_to_reference(x, ref_stats(3, 0), "hybrid")
