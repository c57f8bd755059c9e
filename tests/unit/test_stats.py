import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vl_core.stats import (OUTLIER_MODES, DimStats, dim_stats, find_outliers, mask_outliers, outlier_report,
                           std_ratio)

FAST = settings(max_examples=30, deadline=None)


def rand(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def loud_and_quiet(d=512, loud=12, quiet=396, seed=0):
    """Reference ~N(0,1); VL the same except dim `loud` is 600× louder and dim `quiet` 617× quieter."""
    ref = rand(2, 300, d, seed=seed)
    vl = rand(1, 500, d, seed=seed + 1)
    vl[..., loud] *= 600
    vl[..., quiet] /= 617
    return ref, vl


# ---------------------------------------------------------------- dim_stats

@FAST
@given(b=st.integers(1, 3), n=st.integers(1, 9), d=st.integers(1, 17), seed=st.integers(0, 10**6))
def test_dim_stats_matches_population_mean_std(b, n, d, seed):
    x = rand(b, n, d, seed=seed, scale=3.0) + 1.5
    s = dim_stats(x)
    flat = x.reshape(-1, d)
    assert s.mean.shape == s.std.shape == (d,)
    assert s.count == b * n
    torch.testing.assert_close(s.mean, flat.mean(0))
    torch.testing.assert_close(s.std, flat.std(0, unbiased=False))


def test_dim_stats_token_mask_1d_and_2d():
    x = rand(2, 6, 4, seed=1)
    m1 = torch.tensor([True, False, True, True, False, False])
    s1 = dim_stats(x, m1)
    assert s1.count == 6
    torch.testing.assert_close(s1.mean, x[:, m1].reshape(-1, 4).mean(0))
    m2 = torch.zeros(2, 6, dtype=torch.bool)
    m2[0, 1] = m2[1, 4] = m2[1, 5] = True
    s2 = dim_stats(x, m2)
    assert s2.count == 3
    torch.testing.assert_close(s2.std, x[m2].std(0, unbiased=False))


def test_dim_stats_bad_masks_raise():
    x = rand(2, 6, 4)
    with pytest.raises(ValueError, match="selects no tokens"):
        dim_stats(x, torch.zeros(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask must have shape"):
        dim_stats(x, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask must be a bool"):
        dim_stats(x, torch.ones(6))


def test_dim_stats_constant_input_has_zero_std_no_nan():
    s = dim_stats(torch.full((2, 5, 3), 7.0))
    assert torch.equal(s.std, torch.zeros(3))
    assert torch.equal(s.mean, torch.full((3,), 7.0))
    r = std_ratio(s, s)
    assert torch.isfinite(r).all() and torch.equal(r, torch.ones(3))


def test_dim_stats_bf16_is_computed_in_float32():
    x = rand(1, 64, 8, seed=3, scale=100).to(torch.bfloat16)
    s = dim_stats(x)
    assert s.mean.dtype == torch.float32
    torch.testing.assert_close(s.std, x.float().reshape(-1, 8).std(0, unbiased=False))


def test_dim_stats_rejects_non_finite_and_bad_rank():
    x = rand(1, 4, 3)
    x[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x contains 1 NaN/Inf.*upstream node"):
        dim_stats(x)
    with pytest.raises(ValueError, match=r"x must be a tensor \[batch, tokens, dims\]"):
        dim_stats(rand(4, 3))


# ---------------------------------------------------------------- ratio / outliers

def test_std_ratio_formula_and_width_check():
    a = DimStats(torch.zeros(3), torch.tensor([2.0, 0.0, 1.0]), 10)
    b = DimStats(torch.zeros(3), torch.tensor([1.0, 0.0, 4.0]), 10)
    eps = 1e-6
    torch.testing.assert_close(std_ratio(a, b), torch.tensor([(2 + eps) / (1 + eps), 1.0, (1 + eps) / (4 + eps)]))
    c = DimStats(torch.zeros(4), torch.ones(4), 10)
    with pytest.raises(ValueError, match="width 3 does not match .* width 4"):
        std_ratio(a, c)


def test_find_outliers_is_two_sided_600x_louder_and_quieter():
    ref, vl = loud_and_quiet()
    ratio = std_ratio(dim_stats(vl), dim_stats(ref))
    assert ratio[12] > 500 and ratio[396] < 1 / 500
    out = find_outliers(ratio, 10.0)
    assert out.dtype == torch.bool and out.shape == (512,)
    assert out.nonzero().flatten().tolist() == [12, 396]  # both directions, and no normal dim


def test_quiet_dim_is_caught_even_though_it_is_never_above_threshold():
    # The earlier research code only tested ratio > threshold: dim 396 (617× quieter) slipped through.
    ratio = torch.ones(512)
    ratio[396] = 1 / 617
    assert not (ratio > 10).any()
    assert find_outliers(ratio, 10).nonzero().flatten().tolist() == [396]


@FAST
@given(d=st.integers(2, 64), seed=st.integers(0, 10**6), t=st.floats(1.5, 100.0))
def test_find_outliers_flags_exactly_ratios_outside_band(d, seed, t):
    g = torch.Generator().manual_seed(seed)
    ratio = torch.exp(torch.randn(d, generator=g) * 3)
    out = find_outliers(ratio, t)
    assert torch.equal(out, (ratio > t) | (ratio < 1 / t))
    assert not find_outliers(torch.ones(d), t).any()


@pytest.mark.parametrize("t", [1.0, 0.5, 0, -3, float("nan"), float("inf")])
def test_find_outliers_threshold_must_exceed_one(t):
    with pytest.raises(ValueError, match="threshold must be a finite number > 1"):
        find_outliers(torch.ones(4), t)


def test_find_outliers_rejects_nan_ratio():
    with pytest.raises(ValueError, match="ratio contains 1 NaN/Inf"):
        find_outliers(torch.tensor([1.0, float("nan")]), 10)


# ---------------------------------------------------------------- masking

@FAST
@given(mode=st.sampled_from(OUTLIER_MODES), b=st.integers(1, 3), n=st.integers(1, 9), d=st.integers(2, 16),
       seed=st.integers(0, 10**6), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_mask_outliers_leaves_non_outlier_dims_bit_identical(mode, b, n, d, seed, dtype):
    x = rand(b, n, d, seed=seed, scale=50, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    outliers = torch.rand(d, generator=g) < 0.4
    vl = dim_stats(x)
    ref = dim_stats(rand(2, 7, d, seed=seed + 2))
    y = mask_outliers(x, outliers, mode, vl, ref)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[..., ~outliers], x[..., ~outliers])
    assert torch.isfinite(y).all()


def test_mask_outliers_modes_on_outlier_dims():
    ref_x, vl_x = loud_and_quiet()
    ref, vl = dim_stats(ref_x), dim_stats(vl_x)
    out = find_outliers(std_ratio(vl, ref), 10)
    assert mask_outliers(vl_x, out, "none", vl, ref) is vl_x
    zero = mask_outliers(vl_x, out, "zero", vl, ref)
    assert torch.equal(zero[..., [12, 396]], torch.zeros(1, 500, 2))
    clamp = mask_outliers(vl_x, out, "clamp", vl, ref)
    lo, hi = ref.mean - 3 * ref.std, ref.mean + 3 * ref.std
    assert (clamp[..., 12] >= lo[12]).all() and (clamp[..., 12] <= hi[12]).all()
    assert torch.equal(clamp[..., 396], vl_x[..., 396])  # the quiet dim is already inside ±3σ_ref
    scale = dim_stats(mask_outliers(vl_x, out, "scale", vl, ref))
    torch.testing.assert_close(scale.std[[12, 396]], ref.std[[12, 396]], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(scale.mean[[12, 396]], ref.mean[[12, 396]], rtol=1e-3, atol=1e-4)


def test_mask_outliers_scale_on_constant_dim_has_no_nan():
    x = rand(1, 8, 4)
    x[..., 2] = 5.0
    vl, ref = dim_stats(x), dim_stats(rand(1, 8, 4, seed=9))
    y = mask_outliers(x, torch.tensor([False, False, True, False]), "scale", vl, ref)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[..., 2], ref.mean[2].expand(1, 8))


def test_mask_outliers_bad_arguments():
    x = rand(1, 4, 3)
    s = dim_stats(x)
    with pytest.raises(ValueError, match=r"unknown mask mode 'drop': expected one of 'none', 'zero', 'clamp', 'scale'"):
        mask_outliers(x, torch.zeros(3, dtype=torch.bool), "drop", s, s)
    with pytest.raises(ValueError, match=r"outliers must be a bool tensor \[3\]"):
        mask_outliers(x, torch.zeros(4, dtype=torch.bool), "zero", s, s)
    with pytest.raises(ValueError, match="x width 3 does not match reference stats width 5"):
        mask_outliers(x, torch.zeros(3, dtype=torch.bool), "zero", s, dim_stats(rand(1, 4, 5)))


# ---------------------------------------------------------------- report

def test_outlier_report_names_both_directions():
    ratio = torch.ones(512)
    ratio[12], ratio[396], ratio[7] = 600.0, 1 / 617, 1.5
    out = find_outliers(ratio, 10)
    rep = outlier_report(ratio, out, top_k=3)
    assert rep.splitlines()[0].startswith("2 outlier dims of 512: 1 louder, 1 quieter")
    assert "dim 396: 0.0016× (617× quieter)" in rep
    assert "dim 12: 600× (600× louder)" in rep
    assert "dim 7: 1.50× (1.50× louder)" in rep
    assert rep.index("dim 396") < rep.index("dim 12") < rep.index("dim 7")  # sorted by |log ratio|
    assert len(rep.splitlines()) == 2 + 3
    assert outlier_report(ratio, out, top_k=0).count("\n") == 0


def test_outlier_report_no_outliers():
    rep = outlier_report(torch.ones(4), torch.zeros(4, dtype=torch.bool))
    assert rep.startswith("0 outlier dims of 4: 0 louder, 0 quieter")


# ---------------------------------------------------------------- VL Encode helper

def test_suppress_image_outliers_touches_only_outlier_dims_of_image_tokens():
    from vl_core.stats import suppress_image_outliers
    from vl_core.types import VLEmbeds

    x = rand(1, 120, 16, seed=3)
    x[:, 10:100, 4] *= 600   # image tokens: dim 4 louder ...
    x[:, 10:100, 9] /= 617   # ... and dim 9 quieter than in the text tokens
    emb = VLEmbeds(hidden={30: x, 33: x.clone()}, image_spans=((10, 100),), prompt_span=(100, 115), num_layers=36)
    assert suppress_image_outliers(emb, 10.0, "none") is emb
    out = suppress_image_outliers(emb, 10.0, "scale")
    assert out.extra["outlier_dims"] == {"30": [4, 9], "33": [4, 9]}
    for y in out.hidden.values():
        text = torch.ones(120, dtype=torch.bool)
        text[10:100] = False
        assert torch.equal(y[:, text], x[:, text])                        # text tokens untouched
        keep = torch.ones(16, dtype=torch.bool)
        keep[[4, 9]] = False
        assert torch.equal(y[..., keep], x[..., keep])                    # other dims untouched
        ratio = std_ratio(dim_stats(y, ~text), dim_stats(y, text))
        assert not find_outliers(ratio, 10.0).any()
    assert OUTLIER_MODES == ("none", "zero", "clamp", "scale")  # VL Encode's outlier_mode options, in order
    image_only = VLEmbeds(hidden={30: x[:, 10:100]}, image_spans=((0, 90),), prompt_span=(0, 0), num_layers=36)
    with pytest.raises(ValueError, match="needs both image and text tokens.*set outlier_mode to 'none'"):
        suppress_image_outliers(image_only, 10.0, "zero")
