import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vl_core.pooling import LENGTH_METHODS, concat_tokens, match_length

FAST = settings(max_examples=30, deadline=None)


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


shapes = dict(b=st.integers(1, 3), big_n=st.integers(1, 40), n=st.integers(1, 40), d=st.integers(1, 12),
              seed=st.integers(0, 10**6))


@FAST
@given(method=st.sampled_from(LENGTH_METHODS), **shapes)
def test_shape_law(method, b, big_n, n, d, seed):
    x = rand(b, big_n, d, seed=seed)
    for dtype in (torch.float32, torch.bfloat16):
        y = match_length(x.to(dtype), n, method)
        assert y.shape == (b, n, d) and y.dtype == dtype
        assert torch.isfinite(y).all()


# ---------------------------------------------------------------- pool

@FAST
@given(**shapes)
def test_pool_is_mean_of_each_window(b, big_n, n, d, seed):
    x = rand(b, big_n, d, seed=seed)
    y = match_length(x, n, "pool")
    for i in range(n):
        if n <= big_n:
            lo, hi = (i * big_n) // n, -((-(i + 1) * big_n) // n)  # ⌊iN/n⌋, ⌈(i+1)N/n⌉
        else:
            lo = (i * big_n) // n
            hi = lo + 1
        torch.testing.assert_close(y[:, i], x[:, lo:hi].mean(dim=1))


@FAST
@given(**shapes)
def test_pool_covers_every_token(b, big_n, n, d, seed):
    x = rand(b, big_n, d, seed=seed).requires_grad_(True)
    match_length(x, n, "pool").sum().backward()
    assert (x.grad.abs().sum(dim=-1) > 0).all()


def test_pool_1000_to_20_every_token_matters_unlike_linear_interpolation():
    x = rand(1, 1000, 8, seed=5)
    base = match_length(x, 20, "pool")
    for k in (0, 1, 17, 333, 500, 998, 999):
        xp = x.clone()
        xp[0, k] += 1.0
        assert not torch.equal(match_length(xp, 20, "pool"), base), f"token {k} ignored"
    # gradient: all 1000 tokens reach the output
    xg = x.clone().requires_grad_(True)
    match_length(xg, 20, "pool").sum().backward()
    assert int((xg.grad.abs().sum(-1) > 0).sum()) == 1000
    # linear interpolation samples a handful of tokens and ignores the rest
    xl = x.clone().requires_grad_(True)
    F.interpolate(xl.transpose(1, 2), size=20, mode="linear", align_corners=False).sum().backward()
    seen = int((xl.grad.abs().sum(-1) > 0).sum())
    assert seen <= 40  # ≤ 4% of the tokens
    xp = x.clone()
    k = int((xl.grad.abs().sum(-1) == 0).nonzero()[0, 1])
    xp[0, k] += 1.0
    interp = lambda t: F.interpolate(t.transpose(1, 2), size=20, mode="linear", align_corners=False)  # noqa: E731
    assert torch.equal(interp(xp), interp(x))  # linear interp: perturbing token k changes nothing
    assert not torch.equal(match_length(xp, 20, "pool"), base)


def test_pool_upsampling_repeats_tokens():
    x = torch.arange(3.0).view(1, 3, 1)
    assert match_length(x, 7, "pool").flatten().tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert torch.equal(match_length(x, 6, "pool").flatten(), torch.tensor([0.0, 0, 1, 1, 2, 2]))
    assert torch.equal(match_length(x, 3, "pool"), x)


# ---------------------------------------------------------------- attention_pool

@FAST
@given(with_query=st.booleans(), **shapes)
def test_attention_pool_is_convex_combination(with_query, b, big_n, n, d, seed):
    x = rand(b, big_n, d, seed=seed, scale=5)
    x[:, 0] *= 1000  # a huge-norm token (like Qwen's attention sinks)
    query = rand(b, n, d, seed=seed + 1) if with_query else None
    y = match_length(x, n, "attention_pool", query=query)
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    tol = 1e-4 * (1 + x.abs().amax(dim=1, keepdim=True))
    assert (y >= lo - tol).all() and (y <= hi + tol).all()


def test_attention_pool_identical_tokens_give_that_token():
    tok = rand(1, 1, 6, seed=1)
    x = tok.expand(2, 9, 6).contiguous()
    torch.testing.assert_close(match_length(x, 4, "attention_pool"), tok.expand(2, 4, 6))


def test_attention_pool_huge_norm_token_does_not_take_all_weight():
    # without per-token RMS normalisation, a 1000× token would get softmax weight ≈ 1 for any aligned query
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 50, 64, generator=g)
    x[0, 0] = x[0, 0] * 1000
    q = x[:, 10:11] / x[:, 10:11].norm()  # query aimed at token 10
    y = match_length(x, 1, "attention_pool", query=q)
    # token 10 dominates, not token 0: output is far closer to token 10 than to the huge token
    assert (y[0, 0] - x[0, 10]).norm() < (y[0, 0] - x[0, 0]).norm() / 10


def test_attention_pool_query_checks():
    x = rand(1, 8, 6)
    with pytest.raises(ValueError, match=r"query has 3 tokens but n=4"):
        match_length(x, 4, "attention_pool", query=rand(1, 3, 6))
    with pytest.raises(ValueError, match="query width 5 does not match x width 6"):
        match_length(x, 3, "attention_pool", query=rand(1, 3, 5))
    q = rand(1, 3, 6)
    q[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="query contains 1 NaN/Inf"):
        match_length(x, 3, "attention_pool", query=q)


# ---------------------------------------------------------------- truncate

def test_truncate_takes_first_tokens_and_pads_with_last():
    x = torch.arange(5.0).view(1, 5, 1).expand(2, 5, 3)
    assert torch.equal(match_length(x, 3, "truncate"), x[:, :3])
    assert match_length(x, 8, "truncate")[0, :, 0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    assert torch.equal(match_length(x, 5, "truncate"), x)


# ---------------------------------------------------------------- argument errors

def test_bad_arguments_raise():
    x = rand(1, 5, 3)
    with pytest.raises(ValueError, match=r"unknown length method 'concat': expected one of 'pool', "
                                         r"'attention_pool', 'truncate'"):
        match_length(x, 3, "concat")
    assert "concat" not in LENGTH_METHODS
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=r"n \(target token count\) must be an integer >= 1"):
            match_length(x, bad, "pool")
    x[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains 1 NaN/Inf"):
        match_length(x, 3, "pool")


# ---------------------------------------------------------------- concat

@FAST
@given(b=st.integers(1, 3), nt=st.integers(1, 10), nv=st.integers(1, 30), budget=st.integers(0, 40),
       d=st.integers(1, 8), vl_batch_one=st.booleans(), seed=st.integers(0, 10**6))
def test_concat_shapes(b, nt, nv, budget, d, vl_batch_one, seed):
    text = rand(b, nt, d, seed=seed).to(torch.bfloat16)
    vl = rand(1 if vl_batch_one else b, nv, d, seed=seed + 1)
    y = concat_tokens(text, vl, budget)
    kept = budget if 0 < budget < nv else nv
    assert y.shape == (b, nt + kept, d) and y.dtype == text.dtype
    assert torch.equal(y[:, :nt], text)
    if kept == nv:
        assert torch.equal(y[:, nt:], vl.to(torch.bfloat16).expand(b, -1, -1))
    else:
        assert torch.equal(y[:, nt:], match_length(vl, budget, "pool").to(torch.bfloat16).expand(b, -1, -1))


def test_concat_bad_arguments():
    text, vl = rand(1, 4, 8), rand(1, 6, 16)
    with pytest.raises(ValueError, match="VL width 16 does not match text conditioning width 8: use Qwen3-VL-4B"):
        concat_tokens(text, vl, 0)
    with pytest.raises(ValueError, match=r"budget .* must be an integer >= 0"):
        concat_tokens(text, rand(1, 6, 8), -1)
    with pytest.raises(ValueError, match="VL batch 2 does not match text conditioning batch 3"):
        concat_tokens(rand(3, 4, 8), rand(2, 6, 8), 0)


def test_sqrt_d_scaling_constant():
    # documents the softmax temperature: logits are √D·cos(q, x) after RMS normalisation
    d = 16
    x = torch.zeros(1, 2, d)
    x[0, 0, 0], x[0, 1, 1] = 1.0, 1.0
    q = torch.zeros(1, 1, d)
    q[0, 0, 0] = 1.0
    y = match_length(x, 1, "attention_pool", query=q)
    w0 = math.exp(math.sqrt(d)) / (math.exp(math.sqrt(d)) + 1)
    torch.testing.assert_close(y[0, 0, :2], torch.tensor([w0, 1 - w0]), rtol=1e-3, atol=1e-4)
