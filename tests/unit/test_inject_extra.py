"""Laws of the added-attention shapes (vl_core.inject_extra) on synthetic tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vl_core import inject_extra as X


def sdpa(q, k, v, mask=None):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, lq, d = out.shape
    return out.transpose(1, 2).reshape(b, lq, h * d)


def qkv(b=2, h=2, lq=6, n=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g), torch.randn(1, h, n, d, generator=g),
            torch.randn(1, h, n, d, generator=g))


def test_mask_weights_follow_the_token_grid_and_zero_the_pads():
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half
    w = X.mask_token_weights(mask, 4, 4, 32)
    assert w.shape == (1, 32)
    grid = w[0, :16].view(4, 4)
    assert torch.equal(grid[:, :2], torch.ones(4, 2)) and torch.equal(grid[:, 2:], torch.zeros(4, 2))
    assert torch.equal(w[0, 16:], torch.zeros(16))  # pad tokens never act
    assert torch.allclose(X.mask_token_weights(torch.full((8, 8), 0.25), 2, 2, 4), torch.full((1, 4), 0.25))


def test_rows_token_weights_map_cfg_rows_to_latents():
    weights = torch.arange(2.0)[:, None].expand(2, 3)  # latent 0 → 0, latent 1 → 1
    rows = [(0, 2)]  # the conditional chunk of a [cond, uncond] batch of 2 latents
    assert torch.equal(X.rows_token_weights(weights, rows, 4, 2)[:, 0], torch.tensor([0.0, 1.0]))
    assert torch.equal(X.rows_token_weights(weights, [(2, 4)], 4, 2)[:, 0], torch.tensor([0.0, 1.0]))
    assert X.rows_token_weights(weights[:1], [(0, 4)], 4, 2).shape == (4, 3)  # batch 1 broadcasts
    with pytest.raises(ValueError, match="mask has a batch of 2"):
        X.rows_token_weights(weights, [(0, 3)], 3, 1)


def test_span_bias_gives_reference_masses_in_one_softmax():
    assert X.span_key_bias([((0, 3), 0.5), ((3, 5), 0.5)], 5) is None
    bias = X.span_key_bias([((0, 3), 1.0), ((3, 5), 3.0)], 5)
    assert torch.allclose(bias, torch.tensor([math.log(1 / 3)] * 3 + [0.0, 0.0]))
    assert X.span_key_bias([((0, 2), 0.0), ((2, 4), 1.0)], 4)[:2].isneginf().all()
    # identical keys in both spans: the softmax mass splits 1 : 3 between the references
    q = torch.randn(1, 1, 1, 2)
    k = torch.ones(1, 1, 2, 2)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = sdpa(q, k, v, X.span_key_bias([((0, 1), 1.0), ((1, 2), 3.0)], 2).view(1, 1, 1, -1))
    assert torch.allclose(out, torch.tensor([[[0.25, 0.75]]]), atol=1e-6)


def test_pool_spans_never_mixes_references():
    tokens = torch.cat([torch.zeros(1, 30, 4), torch.ones(1, 10, 4)], dim=1)
    pooled, spans = X.pool_spans(tokens, [((0, 30), 1.0), ((30, 40), 2.0)], 8)
    assert spans == [((0, 6), 1.0), ((6, 8), 2.0)]
    assert torch.equal(pooled[:, :6], torch.zeros(1, 6, 4)) and torch.equal(pooled[:, 6:], torch.ones(1, 2, 4))
    same, same_spans = X.pool_spans(tokens, [((0, 40), 1.0)], 0)
    assert same is tokens and same_spans == [((0, 40), 1.0)]


def summed(terms):
    return sum(attn * coef for attn, coef in terms)


def test_kv_scales():
    q, k, v = qkv()
    attn = lambda q_, k_, v_, m: sdpa(q_, k_.expand(q_.shape[0], -1, -1, -1), v_.expand(q_.shape[0], -1, -1, -1), m)
    src = X.Source(k, v)
    w = 1.7
    by_v = summed(X.attention_terms(attn, q, [src], w, "v"))
    assert torch.allclose(by_v, w * attn(q, k, v, None), atol=1e-6)
    by_kv = summed(X.attention_terms(attn, q, [src], w, "k_and_v"))
    assert torch.allclose(by_kv, w * attn(q * w, k, v, None), atol=1e-5)  # softmax(q·(wk)ᵀ) = softmax((wq)·kᵀ)
    assert not torch.allclose(by_kv, by_v)
    with pytest.raises(ValueError, match="kv_scale"):
        X.scaled_source(src, w, "k")


def test_a_negative_equal_to_the_positive_cancels_exactly():
    q, k, v = qkv()
    attn = lambda q_, k_, v_, m: sdpa(q_, k_.expand(q_.shape[0], -1, -1, -1), v_.expand(q_.shape[0], -1, -1, -1), m)
    out = torch.randn(2, 9, 8)
    before = out.clone()
    terms = X.attention_terms(attn, q, [X.Source(k, v), X.Source(k, v, None, -1.0)], 0.8, "v")
    X.accumulate_(out, terms, [(0, 2)], 3)
    assert torch.allclose(out, before, atol=1e-6)  # + w·a − w·a
    half = summed(X.attention_terms(attn, q, [X.Source(k, v), X.Source(k, v, None, -0.5)], 0.8, "v"))
    assert torch.allclose(half, 0.4 * attn(q, k, v, None), atol=1e-6)


def test_joint_attention_is_one_softmax_over_own_and_reference_keys():
    q, k_ref, v_ref = qkv(b=1)
    g = torch.Generator().manual_seed(3)
    k_own, v_own = torch.randn(1, 2, 7, 4, generator=g), torch.randn(1, 2, 7, 4, generator=g)
    attn = lambda q_, k_, v_, m: sdpa(q_, k_, v_, m)
    joint = X.joint_attention(attn, q, k_own, v_own, X.Source(k_ref, v_ref), 1.0)
    assert torch.allclose(joint, sdpa(q, torch.cat([k_own, k_ref], 2), torch.cat([v_own, v_ref], 2)), atol=1e-6)
    faint = X.joint_attention(attn, q, k_own, v_own, X.Source(k_ref, v_ref), 1e-30)
    assert torch.allclose(faint, sdpa(q, k_own, v_own), atol=1e-5)  # log w → −∞: the reference fades out
    with pytest.raises(ValueError, match="positive weight"):
        X.joint_attention(attn, q, k_own, v_own, X.Source(k_ref, v_ref), -0.5)


def test_adain_takes_the_reference_statistics():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 2, 50, 4, generator=g) * 3 + 1
    ref = torch.randn(1, 2, 40, 4, generator=g) * 0.5 - 2
    out = X.adain_tokens(x, ref)
    assert torch.allclose(out.mean(-2), ref.mean(-2).expand(2, -1, -1), atol=1e-4)
    assert torch.allclose(out.std(-2, correction=0), ref.std(-2, correction=0).expand(2, -1, -1), atol=1e-3)


def test_accumulate_leaves_zero_weight_tokens_bit_identical():
    out = torch.randn(3, 10, 4)
    before = out.clone()
    delta = torch.randn(2, 6, 4)
    weights = torch.tensor([[1.0, 0.0, 0.5, 0.0, 1.0, 0.0]] * 2)
    got = X.accumulate_(out, [(delta, 0.5)], [(0, 1), (2, 3)], 4, weights)
    assert torch.equal(got[1], before[1])  # an unselected row
    zero = weights[0] == 0
    assert torch.equal(got[0, 4:][zero], before[0, 4:][zero]) and torch.equal(got[:, :4], before[:, :4])
    assert torch.allclose(got[2, 4:], before[2, 4:] + 0.5 * delta[1] * weights[1][:, None])


def test_accumulate_replace_is_a_lerp_by_the_mask():
    out = torch.randn(1, 6, 4)
    before = out.clone()
    joint = torch.randn(1, 4, 4)
    weights = torch.tensor([[0.0, 1.0, 0.25, 0.0]])
    X.accumulate_(out, [], [(0, 1)], 2, weights, replace=joint)
    assert torch.equal(out[0, 2], before[0, 2]) and torch.equal(out[0, 5], before[0, 5])
    assert torch.equal(out[0, 3], joint[0, 1])
    assert torch.allclose(out[0, 4], before[0, 4] + 0.25 * (joint[0, 2] - before[0, 4]))
    plain = before.clone()
    X.accumulate_(plain, [], [(0, 1)], 2, None, replace=joint)
    assert torch.equal(plain[0, 2:], joint[0])


def test_steer_tokens_is_relative_to_each_token_rms():
    x = torch.randn(2, 5, 8) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0])[None, :, None]
    d = torch.randn(1, 8)
    out = X.steer_tokens(x, d, 0.5)
    step = out - x
    rms = x.square().mean(-1).sqrt()
    assert torch.allclose(step.square().mean(-1).sqrt(), 0.5 * rms, rtol=1e-4)
    d_unit = d / d.square().mean().sqrt()
    assert torch.allclose(step / rms[..., None], 0.5 * d_unit.expand(2, 5, 8), atol=1e-5)
    masked = X.steer_tokens(x, d, 0.5, torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]] * 2))
    assert torch.equal(masked[:, 0], x[:, 0]) and not torch.equal(masked[:, 1], x[:, 1])
