"""The elementwise steps between the Qwen3-VL runner's matmuls: eager twins and the forms torch.compile takes.

Each step is a small pure function of tensors (rows first: [R, ...], R = batch · tokens, unless DYNAMIC_DIMS says
otherwise). The eager twin is exactly the runner's op order without compilation; COMPILED_FORMS hold the form
inductor compiles where the eager order does not compile to one pass. fusion.py compiles them and hands the runner
one set or the other; step_examples builds the dummies the background compile traces.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

def rope(x, cos, ssin):
    """Rotate-half RoPE on the last dim, x·cos + rotate_half(x)·sin in x's dtype (ComfyUI's op order: one
    product, two in-place multiply-adds); ssin = signed sin [-sin(first half), sin(second half)]."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], ssin[..., :half])
    out[..., half:].addcmul_(x[..., :half], ssin[..., half:])
    return out


def add_rms_norm(x, r, w, eps: float):
    """h = x + r; (h, h / sqrt(mean(h²) + eps) · w): residual add and the next RMSNorm."""
    h = x + r
    return h, F.rms_norm(h, (h.shape[-1],), w, eps)


def add_layer_norm(x, r, w, b, eps: float):
    """h = x + r; (h, LayerNorm(h)·w + b): residual add and the next LayerNorm."""
    h = x + r
    return h, F.layer_norm(h, (h.shape[-1],), w, b, eps)


def qk_norm_rope(q, k, qw, kw, q_eps: float, k_eps: float, cos, ssin):
    """Per-head RMSNorm then RoPE of q [R, H, hd] and k [R, Hkv, hd]; cos, ssin [R, 1, hd]."""
    q = rope(F.rms_norm(q, (q.shape[-1],), qw, q_eps), cos, ssin)
    k = rope(F.rms_norm(k, (k.shape[-1],), kw, k_eps), cos, ssin)
    return q, k


def qkv_norm_rope(qkv, qw, kw, q_eps: float, k_eps: float, cos, ssin, heads: int, kv_heads: int):
    """qk_norm_rope of q = qkv[:, :heads], k = qkv[:, heads:heads + kv_heads] of one joint projection
    qkv [R, heads + 2·kv_heads, hd] (v, the rest, is read by the caller as a view)."""
    return qk_norm_rope(qkv[:, :heads], qkv[:, heads:heads + kv_heads], qw, kw, q_eps, k_eps, cos, ssin)


def qkv_rope(qkv, cos, ssin):
    """Vision q, k of qkv [R, 3, H, hd] rotated (each [R, H, hd]); cos, ssin [R, 1, 1, hd]."""
    return rope(qkv[:, :2], cos, ssin).unbind(1)


def silu_mul(g, u):
    """SiLU(g) · u (the gated MLP's product)."""
    return F.silu(g) * u


def silu_mul_joint(gu):
    """silu_mul of gu = [g | u] [R, 2F], one joint gate/up projection (its halves read as views)."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def image_windows(images, patch: int, merge: int):
    """[B, H, W, c] images → their merge windows [B·H/(m·p), W/(m·p), m, m, c, p, p], a view (a copy only where
    the images are not contiguous): the layout patch_rows reads. Not a step (views launch no kernel)."""
    b, h, w, c = images.shape
    x = images.reshape(b * (h // (merge * patch)), merge, patch, w // (merge * patch), merge, patch, c)
    return x.permute(0, 3, 1, 4, 6, 2, 5)


def patch_rows(windows, mean: float, std: float, temporal: int, dtype):
    """Patch-embedding input rows of merge windows [R, G, m, m, c, p, p] (image_windows, 0..1): (x − mean)/std,
    each frame repeated `temporal` times → [R·G·m·m, c·T·p·p] in dtype (preprocess.to_patches' values and order)."""
    r, g, m1, m2, c, p1, p2 = windows.shape
    x = ((windows.float() - mean) / std).unsqueeze(5).expand(r, g, m1, m2, c, temporal, p1, p2)
    return x.reshape(r * g * m1 * m2, c * temporal * p1 * p2).to(dtype)


def interpolated_position(table, taps, weights, dtype):
    """Σⱼ weights[:, j]·table[taps[:, j]] [P, D]: the bilinearly interpolated position embedding (float32 sum, in
    dtype)."""
    return (F.embedding(taps, table).float() * weights[:, :, None]).sum(1).to(dtype)


def add_position(x, table, taps, weights):
    """x + interpolated_position of P patches, added in x's dtype; x [B·P, D] (B images' rows), taps / weights
    [P, 4]."""
    pos = interpolated_position(table, taps, weights, x.dtype)
    return (x.view(-1, *pos.shape) + pos).view(x.shape)


def add_position_rows(x, table, taps, weights):
    """add_position with row i reading patch i mod P: what inductor compiles (one pass; broadcasting over a
    dynamic image count would specialise the graph on whether it is 1)."""
    pos = interpolated_position(table, taps, weights, x.dtype)
    return x + pos[torch.arange(x.shape[0], device=x.device) % pos.shape[0]]


def linear_gelu_tanh(x, w, b):
    """GELU_tanh(x Wᵀ + b) (the vision MLP's first layer)."""
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def linear_gelu_tanh_epilogue(x, w, b):
    """linear_gelu_tanh with the GELU in the GEMM's epilogue on CUDA (cuBLASLt GELU_BIAS, through
    torch._addmm_activation: one kernel instead of GEMM + a GELU pass over [R, 4·D]); eager elsewhere."""
    if b is None or not x.is_cuda or not hasattr(torch, "_addmm_activation"):
        return linear_gelu_tanh(x, w, b)
    y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True)
    return y.view(*x.shape[:-1], w.shape[0])


def rope_functional(x, cos, ssin):
    """rope() without in-place slice updates: x·cos + [x₂, x₁]·ssin (the sign lives in ssin). What inductor
    compiles: the slice-wise addcmul_ of the eager op order became several kernels per step (≈ 23 µs per
    language-model layer for the q/k norm + RoPE on an H200, bench/kernel_shapes.py), this one pointwise pass."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * ssin


def qk_norm_rope_functional(q, k, qw, kw, q_eps: float, k_eps: float, cos, ssin):
    """qk_norm_rope through rope_functional."""
    q = rope_functional(F.rms_norm(q, (q.shape[-1],), qw, q_eps), cos, ssin)
    k = rope_functional(F.rms_norm(k, (k.shape[-1],), kw, k_eps), cos, ssin)
    return q, k


def qkv_norm_rope_functional(qkv, qw, kw, q_eps: float, k_eps: float, cos, ssin, heads: int, kv_heads: int):
    """qkv_norm_rope through rope_functional."""
    return qk_norm_rope_functional(qkv[:, :heads], qkv[:, heads:heads + kv_heads], qw, kw, q_eps, k_eps, cos, ssin)


def qkv_rope_functional(qkv, cos, ssin):
    """qkv_rope through rope_functional."""
    return rope_functional(qkv[:, :2], cos, ssin).unbind(1)


def step_examples(runner, rows: int, vision_rows: int) -> dict:
    """Dummy arguments of every fused step at a Qwen3VLRunner encode's row counts (its real norm weights, compute
    dtype, device, image wire dtype): what the background compile traces (a list: each variant traced). Sizes
    marked dynamic differ from each other here (dynamo would otherwise assume equal sizes stay equal: "duck
    sizing")."""
    s, layer, blk = runner.spec, runner.lm.layers[0], runner.visual.blocks[0]

    def z(*shape, dtype=None):
        return torch.zeros(shape, dtype=dtype or runner.dtype, device=runner.device)

    def norm(m):
        w, b, eps, tok = runner._norm_params(m)
        if tok is not None:        # a per-call cast: keep a copy, give the cast back
            w, b = w.clone(), (b.clone() if b is not None else None)
            runner._release(m, w, b, tok)
        return w, b, eps

    def weight(m):                 # the tensor (type) the forward reads: a Parameter where resident
        w, b, tok = runner.weights.get(m)
        if tok is not None:
            w = w.clone()
            runner._release(m, w, b, tok)
        return w

    def image(*shape):             # the caller's image (an upload, or the tensor itself on the CPU): made under
        with torch.inference_mode(False):      # inference mode or not (dynamo tells them apart: both traced)
            plain = z(*shape, dtype=runner.image_dtype())
        return [(image_windows(t, s.patch_size, s.merge_size), s.image_mean, s.image_std, s.temporal_patch_size,
                 runner.dtype) for t in (plain, z(*shape, dtype=runner.image_dtype()))]

    w, _, eps = norm(layer.input_layernorm)
    qw, _, qe = norm(layer.self_attn.q_norm)
    kw, _, ke = norm(layer.self_attn.k_norm)
    vw, vb, veps = norm(blk.norm1)
    f = layer.mlp.gate_proj.weight.shape[0]
    hd, vhd = s.head_dim, s.vision_head_dim
    side = max(2, math.isqrt(max(vision_rows, 1)) // s.merge_size)          # merge windows per image side
    patches = side * (side + 1) * s.merge_size ** 2
    return {"add_rms_norm": (z(rows, s.hidden), z(rows, s.hidden), w, eps),
            "qk_norm_rope": (z(rows, s.heads, hd), z(rows, s.kv_heads, hd), qw, kw, qe, ke,
                             z(rows, 1, hd), z(rows, 1, hd)),
            "qkv_norm_rope": (z(rows, s.heads + 2 * s.kv_heads, hd), qw, kw, qe, ke, z(rows, 1, hd), z(rows, 1, hd),
                              s.heads, s.kv_heads),
            "silu_mul": (z(rows, f), z(rows, f)),
            "silu_mul_joint": (z(rows, 2 * f),),
            "add_layer_norm": (z(vision_rows, s.vision_hidden), z(vision_rows, s.vision_hidden), vw, vb, veps),
            "qkv_rope": (z(vision_rows, 3, s.vision_heads, vhd), z(vision_rows, 1, 1, vhd),
                         z(vision_rows, 1, 1, vhd)),
            "patch_rows": image(1, side * s.merge_size * s.patch_size, (side + 1) * s.merge_size * s.patch_size, 3),
            "add_position": (z(2 * patches, s.vision_hidden), weight(runner.visual.pos_embed),
                             z(patches, 4, dtype=torch.long), z(patches, 4, dtype=torch.float32))}

STEPS = {f.__name__: f for f in (add_rms_norm, add_layer_norm, qk_norm_rope, qkv_norm_rope, qkv_rope, silu_mul,
                                 silu_mul_joint, patch_rows, add_position)}
DYNAMIC_DIMS = {"patch_rows": {0: (0, 1)}}     # step -> {argument: dims compiled as dynamic}; else dim 0 of 2-D+
COMPILED_FORMS = {"qk_norm_rope": qk_norm_rope_functional,     # what torch.compile takes for a step, where its
                  "qkv_norm_rope": qkv_norm_rope_functional,   # eager op order does not compile to one pass
                  "qkv_rope": qkv_rope_functional,
                  "add_position": add_position_rows}
EAGER_ONLY = {"linear_gelu_tanh": linear_gelu_tanh}                # steps torch.compile does not take over:
FUSED_ONLY = {"linear_gelu_tanh": linear_gelu_tanh_epilogue}       # their fused form is a library kernel
