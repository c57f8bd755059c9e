import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vl_core import inject

FAST = settings(max_examples=40, deadline=None)


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def bits_equal(a, b):
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(ints[a.element_size()]), b.contiguous().view(ints[b.element_size()]))


# --------------------------------------------------------------------------- rows

@pytest.mark.parametrize("coru, batch, apply_to, want", [
    ([0, 1], 4, "cond_only", [(0, 2)]),
    ([1, 0], 4, "cond_only", [(2, 4)]),
    ([0, 1], 4, "both", [(0, 4)]),
    ([1], 2, "cond_only", []),
    ([0], 3, "cond_only", [(0, 3)]),
    ([0, 0, 1], 6, "cond_only", [(0, 4)]),
    ([0, 1, 0], 3, "cond_only", [(0, 1), (2, 3)]),
    (None, 5, "cond_only", [(0, 5)]),
    ([], 5, "cond_only", [(0, 5)]),
])
def test_chunk_rows(coru, batch, apply_to, want):
    assert inject.chunk_rows(coru, batch, apply_to) == want


def test_chunk_rows_errors():
    with pytest.raises(ValueError, match="equal cond/uncond chunks"):
        inject.chunk_rows([0, 1], 3, "cond_only")
    with pytest.raises(ValueError, match="apply_to"):
        inject.chunk_rows([0], 1, "positive")
    assert inject.rows_cover([(0, 4)], 4) and not inject.rows_cover([(0, 2)], 4)


def test_gather_rows():
    x = rand(6, 2)
    assert inject.gather_rows(x, [(1, 3)]).data_ptr() == x[1:3].data_ptr()  # a view
    assert torch.equal(inject.gather_rows(x, [(0, 1), (4, 6)]), x[[0, 4, 5]])


# --------------------------------------------------------------------------- caption stream

@FAST
@given(st.integers(1, 3), st.integers(1, 9), st.floats(-1.5, 1.5), st.sampled_from(inject.CAPTION_MODES),
       st.integers(0, 10**6))
def test_caption_update_formula(b, n, w, mode, seed):
    txt, vl = rand(b, n, 8, seed=seed), rand(1, n, 8, seed=seed + 1)
    got = inject.caption_update(txt, vl, w, mode, [(0, b)])
    want = txt + w * (vl - txt) if mode == "lerp" else txt + w * vl
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_caption_update_lerp_endpoints_and_zero_weight():
    txt, vl = rand(2, 5, 8), rand(1, 5, 8, seed=1)
    assert torch.equal(inject.caption_update(txt, vl, 1.0, "lerp", [(0, 2)]), vl.expand(2, -1, -1))
    for mode in inject.CAPTION_MODES:
        assert bits_equal(inject.caption_update(txt, vl, 0.0, mode, [(0, 2)]), txt)


def test_caption_update_in_place_touches_only_the_selected_rows_of_a_slice():
    """Like the model: txt is a view img[:, :L] of the full sequence; only rows (and only the slice) change."""
    img = rand(4, 12, 8)
    before = img.clone()
    txt = img[:, :5]
    vl = rand(1, 5, 8, seed=3)
    inject.caption_update_(txt, vl, 0.5, "lerp", [(2, 4)])
    assert torch.equal(img[:2], before[:2]) and torch.equal(img[:, 5:], before[:, 5:])
    torch.testing.assert_close(img[2:, :5], before[2:, :5] + 0.5 * (vl - before[2:, :5]))


def test_caption_update_per_row_vl_and_errors():
    txt, vl = rand(2, 3, 4), rand(2, 3, 4, seed=1)
    torch.testing.assert_close(inject.caption_update(txt, vl, 1.0, "add", [(1, 2)])[1], txt[1] + vl[1])
    with pytest.raises(ValueError, match="do not match the caption slice"):
        inject.caption_update(txt, rand(1, 4, 4), 0.5, "lerp", [(0, 2)])
    with pytest.raises(ValueError, match="caption mode"):
        inject.caption_update(txt, vl, 0.5, "mix", [(0, 2)])


def test_caption_update_bf16():
    txt, vl = rand(1, 4, 8, dtype=torch.bfloat16), rand(1, 4, 8, seed=1, dtype=torch.bfloat16)
    out = inject.caption_update(txt, vl, 0.25, "lerp", [(0, 1)])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (txt.float() + 0.25 * (vl.float() - txt.float())), rtol=2e-2, atol=2e-2)


def test_inplace_ok():
    x = torch.zeros(2, requires_grad=True)
    assert not inject.inplace_ok(x)
    with torch.no_grad():
        assert inject.inplace_ok(x)
    with torch.inference_mode():
        y = torch.zeros(2)
        assert inject.inplace_ok(y)
    assert not inject.inplace_ok(y)  # an inference tensor outside inference mode
    assert inject.inplace_ok(torch.zeros(2))


# --------------------------------------------------------------------------- projections

def test_modulate():
    x, s = rand(1, 3, 4), rand(2, 4, seed=1)
    torch.testing.assert_close(inject.modulate(x, s), torch.stack([x[0] * (1 + s[0]), x[0] * (1 + s[1])]))


@pytest.mark.parametrize("h, hkv", [(4, 4), (4, 2), (6, 1)])
def test_split_kv_both_layouts(h, hkv):
    d = 3
    q, k, v = rand(2, 5, h * d), rand(2, 5, hkv * d, seed=1), rand(2, 5, hkv * d, seed=2)
    for proj in (torch.cat([q, k, v], -1), torch.cat([k, v], -1)):
        k2, v2 = inject.split_kv(proj, h, hkv, d)
        assert torch.equal(k2, k.view(2, 5, hkv, d)) and torch.equal(v2, v.view(2, 5, hkv, d))
    with pytest.raises(ValueError, match="projection width"):
        inject.split_kv(rand(2, 5, 7), h, hkv, d)


@pytest.mark.parametrize("n_rep", [1, 2, 3])
def test_repeat_kv_matches_the_models_gqa_layout(n_rep):
    k = rand(2, 5, 2, 4)
    model_way = k.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)  # JointAttention's repeat
    assert torch.equal(inject.repeat_kv(k, n_rep), model_way)


def test_rms_norm_heads():
    x, w = rand(2, 3, 4, 8), rand(8, seed=1)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(inject.rms_norm_heads(x, w, 1e-6), want)
    torch.testing.assert_close(inject.rms_norm_heads(x, None, 1e-6), want / w)


def _freqs(pos, d, theta=256.0):
    """Flux/ComfyUI layout [1, N, 1, d/2, 2, 2] of a 1-axis RoPE."""
    omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos.double()[:, None] * omega[None]
    c, s = ang.cos(), ang.sin()
    return torch.stack([c, -s, s, c], -1).reshape(1, len(pos), 1, d // 2, 2, 2).float()


def test_apply_rope_rotates_pairs():
    d = 8
    x = rand(1, 4, 2, d)
    pos = torch.tensor([0.0, 1.0, 2.0, 7.0])
    out = inject.apply_rope(x, _freqs(pos, d))
    assert torch.equal(out[:, 0], x[:, 0])  # position 0 = identity
    ang = pos[:, None] * (1.0 / 256.0 ** (torch.arange(0, d, 2) / d))[None]
    z = torch.view_as_complex(x.reshape(1, 4, 2, d // 2, 2).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)[None, :, None]).reshape(1, 4, 2, d)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


# --------------------------------------------------------------------------- decoupled attention

@pytest.mark.parametrize("n, m, want", [(20, 32, 32), (32, 32, 32), (33, 32, 64), (0, 32, 0), (7, None, 7), (7, 0, 7)])
def test_padded_length(n, m, want):
    assert inject.padded_length(n, m) == want


# --------------------------------------------------------------------------- pooling, segments, K/V recipe

def test_pool_to_budget():
    x = rand(1, 10, 4)
    assert inject.pool_to_budget(x, 0) is x and inject.pool_to_budget(x, 10) is x and inject.pool_to_budget(x, 99) is x
    pooled = inject.pool_to_budget(x, 5)
    assert torch.allclose(pooled, x.reshape(1, 5, 2, 4).mean(2))


def test_image_token_count():
    assert inject.image_token_count(64, 64, 2, 32) == 1024
    assert inject.image_token_count(5, 7, 2, 32) == 32  # 3 x 4 = 12, padded to 32
    assert inject.image_token_count(5, 7, 2, None) == 12


@pytest.mark.parametrize("rows, batch, want", [
    ([(0, 2)], 4, [(0, 2, True), (2, 4, False)]),
    ([(2, 4)], 4, [(0, 2, False), (2, 4, True)]),
    ([(0, 1), (2, 3)], 4, [(0, 1, True), (1, 2, False), (2, 3, True), (3, 4, False)]),
    ([(0, 4)], 4, [(0, 4, True)]),
    ([], 3, [(0, 3, False)]),
])
def test_batch_segments_cover_the_batch_in_order(rows, batch, want):
    assert inject.batch_segments(rows, batch) == want
    calls = []
    out = inject.run_by_segments(rows, batch, lambda s, e, sel: calls.append((s, e, sel)) or torch.arange(s, e))
    assert calls == want and torch.equal(out, torch.arange(batch))


def test_cut_batch_and_chunk_lists():
    x = rand(4, 3)
    assert torch.equal(inject.cut_batch(x, 1, 3, 4), x[1:3])
    assert inject.cut_batch(x, 1, 3, 5) is x and inject.cut_batch(7, 0, 1, 4) == 7
    assert inject.cut_chunk_list([0, 1], 2, 4, 4, 2) == [1] and inject.cut_chunk_list([0, 1], 0, 4, 4, 2) == [0, 1]
    assert inject.cut_chunk_list([0, 1, 2], 0, 2, 4, 2) == [0, 1, 2]  # not a per-chunk list: unchanged
    assert inject.rows_within([(0, 2), (3, 5)], 1, 4) == [(0, 1), (2, 3)] and inject.rows_within([(0, 1)], 1, 2) == []


def test_vl_keys_values_is_the_block_recipe():
    """norm → ×(1 + scale) → fused projection → split → k-norm → RoPE → GQA repeat, by hand."""
    b, n, heads, kv_heads, d = 2, 5, 4, 2, 8
    hidden, scale = rand(1, n, heads * d, seed=1), rand(b, heads * d, seed=2)
    weight = rand(2 * kv_heads * d, heads * d, seed=3)
    angle = rand(1, n, 1, d // 2, seed=4)
    freqs = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2)

    def norm(x):
        return x * 2.0

    def k_norm(k):
        return k / k.norm(dim=-1, keepdim=True)

    k, v = inject.vl_keys_values(hidden, scale, norm=norm, project_kv=lambda h: h @ weight.T, k_norm=k_norm,
                                 n_heads=heads, n_kv_heads=kv_heads, head_dim=d, freqs=freqs)
    h = (hidden * 2.0) * (1 + scale[:, None])
    proj = h @ weight.T
    k_ref = k_norm(proj[..., :kv_heads * d].reshape(b, n, kv_heads, d))
    k_ref = inject.apply_rope(k_ref, freqs)
    v_ref = proj[..., kv_heads * d:].reshape(b, n, kv_heads, d)
    assert k.shape == v.shape == (b, heads, n, d)
    assert torch.allclose(k, k_ref.repeat_interleave(2, dim=2).movedim(1, 2), atol=1e-6)
    assert torch.equal(v, v_ref.repeat_interleave(2, dim=2).movedim(1, 2))
    k0, _ = inject.vl_keys_values(hidden, scale, norm=norm, project_kv=lambda h: h @ weight.T, k_norm=k_norm,
                                  n_heads=heads, n_kv_heads=kv_heads, head_dim=d)
    assert not torch.allclose(k0, k)  # no freqs: no rotation


