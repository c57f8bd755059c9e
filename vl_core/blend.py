"""Mixing VL hidden states into text conditioning: blends, token ramps, style deltas and AdaIN.

All ops compute in float32 and return text's (content's) dtype. A VL-side tensor of batch 1 is broadcast
over the text batch. Weight/strength endpoints are exact by construction (torch.where), so weight 0 gives
back the text tensor bit for bit, and weight 1 gives the VL tensor (cast to text's dtype).
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from .checks import require_choice, require_finite, require_tokens, require_width
from .stats import EPS

ANGLE_EPS = 1e-4  # radians: below this (or this close to π) slerp falls back to linear


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, same_length: bool = True) -> None:
    """a is the text/content side [B, N, D]; b the VL/style side [B|1, M, D] (M = N if same_length)."""
    require_tokens(name_a, a)
    require_tokens(name_b, b)
    require_width(name_b, b.shape[-1], name_a, a.shape[-1])
    if b.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"{name_b} batch {b.shape[0]} does not match {name_a} batch {a.shape[0]}: "
                         "give one VL encoding (batch 1) or one per text batch item")
    if same_length and b.shape[1] != a.shape[1]:
        raise ValueError(f"{name_b} has {b.shape[1]} tokens but {name_a} has {a.shape[1]}: match lengths "
                         "first (pooling.match_length)")
    require_finite(name_a, a)
    require_finite(name_b, b)


def _token_weight(name: str, weight, like: torch.Tensor) -> torch.Tensor:
    """float32 weight broadcastable to like [B, N, D]: scalar → [], [N] → [1, N, 1], [B, N] → [B, N, 1]."""
    b, n, _ = like.shape
    if isinstance(weight, Real) and not isinstance(weight, bool):
        w = torch.tensor(float(weight), dtype=torch.float32, device=like.device)
    elif torch.is_tensor(weight):
        w = weight.detach().to(device=like.device, dtype=torch.float32)
        if w.ndim == 1 and w.shape[0] == n:
            w = w.view(1, n, 1)
        elif w.ndim == 2 and tuple(w.shape) in ((b, n), (1, n)):
            w = w.unsqueeze(-1)
        elif w.ndim != 0:
            raise ValueError(f"{name} must be a number or a per-token tensor [{n}] (or [{b}, {n}]), "
                             f"got shape {tuple(w.shape)}")
    else:
        raise ValueError(f"{name} must be a number or a tensor, got {type(weight).__name__}")
    require_finite(name, w)
    return w


def _pinned(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """where(w = 0, a, where(w = 1, b, mixed)) in a's dtype: exact endpoints regardless of rounding."""
    out = torch.where(w == 1, b.to(a.dtype), mixed.to(a.dtype))
    return torch.where(w == 0, a, out)


def _lerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(1 − w)·a + w·b."""
    return (1 - w) * a + w * b


def _slerp(t: torch.Tensor, v: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per token: [sin((1−w)θ)·t̂ + sin(wθ)·v̂]/sin θ · ((1−w)|t| + w|v|), θ = ∠(t, v); linear if θ≈0, θ≈π or |·|≈0."""
    nt = t.norm(dim=-1, keepdim=True)
    nv = v.norm(dim=-1, keepdim=True)
    ut = t / nt.clamp_min(eps)
    uv = v / nv.clamp_min(eps)
    theta = 2 * torch.atan2((ut - uv).norm(dim=-1, keepdim=True), (ut + uv).norm(dim=-1, keepdim=True))
    degenerate = (theta < ANGLE_EPS) | (math.pi - theta < ANGLE_EPS) | (nt < eps) | (nv < eps)
    sin_theta = torch.where(degenerate, torch.ones_like(theta), torch.sin(theta))
    direction = (torch.sin((1 - w) * theta) * ut + torch.sin(w * theta) * uv) / sin_theta
    slerped = direction * ((1 - w) * nt + w * nv)
    return torch.where(degenerate, _lerp(t, v, w), slerped)


MIXES = {"linear": _lerp, "slerp": _slerp}  # mode → mix(t, v, w), all float32
BLEND_MODES = tuple(MIXES)


def blend(text: torch.Tensor, vl: torch.Tensor, weight, mode: str) -> torch.Tensor:
    """Mix VL states into text conditioning, same [B, N, D] (vl batch may be 1); weight: float or per-token [N].

    linear: (1 − w)·t + w·v
    slerp:  slerp(t̂, v̂, w)·((1 − w)|t| + w|v|) per token (direction on the great circle, norm interpolated)
    """
    require_choice("blend mode", mode, BLEND_MODES)
    _check_pair("text conditioning", text, "VL", vl)
    w = _token_weight("weight", weight, text)
    t, v = text.float(), vl.to(text.device).float()
    mixed = MIXES[mode](t, v, w)
    return _pinned(w, text, vl.to(text.device).expand_as(text), mixed)


RAMPS = {  # shape → per-token weights [n] for (n, α)
    "constant": lambda n, alpha: torch.full((n,), alpha, dtype=torch.float32),
    "graduated": lambda n, alpha: alpha * torch.arange(1, n + 1, dtype=torch.float32) / n,
}
RAMP_SHAPES = tuple(RAMPS)


def token_ramp(n: int, alpha: float, shape: str) -> torch.Tensor:
    """Per-token VL weights, float32 [n].

    constant:  w_i = α
    graduated: w_i = α·(i + 1)/n   (i = 0..n−1: later tokens take more VL, the last takes α)
    """
    require_choice("ramp shape", shape, RAMP_SHAPES)
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ValueError(f"n (token count) must be an integer >= 1, got {n!r}")
    if not (isinstance(alpha, Real) and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    return RAMPS[shape](int(n), float(alpha))


def _mean_token_rms(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1]: mean_i sqrt(mean_d x_{i,d}²)."""
    return x.square().mean(dim=-1, keepdim=True).sqrt().mean(dim=-2, keepdim=True)


def style_delta(text: torch.Tensor, vl_style: torch.Tensor, vl_neutral: torch.Tensor, strength,
                normalize: bool, eps: float = EPS) -> torch.Tensor:
    """text + s·δ with δ = vl_style − vl_neutral (all [B, N, D]; VL batch may be 1).

    normalize: δ ← δ · rms(text)/(rms(δ) + eps), rms = mean over tokens of the per-token RMS (per batch item).
    """
    _check_pair("text conditioning", text, "VL style", vl_style)
    _check_pair("text conditioning", text, "VL neutral", vl_neutral)
    s = _token_weight("strength", strength, text)
    t = text.float()
    delta = vl_style.to(text.device).float() - vl_neutral.to(text.device).float()
    if normalize:
        delta = delta * (_mean_token_rms(t) / (_mean_token_rms(delta) + eps))
    out = (t + s * delta).to(text.dtype)
    return torch.where(s == 0, text, out)


ADAIN_AXES = {"per_token": -1, "per_dim": -2}  # mode → the axis the statistics run over (-1: per token, over D)
ADAIN_MODES = tuple(ADAIN_AXES)


def adain(content: torch.Tensor, style: torch.Tensor, mode: str, weight=1.0, eps: float = EPS) -> torch.Tensor:
    """Adaptive instance norm of content to style, then lerp(content, result, weight).

    per_token: stats over D of token i (same N):  (c − μ_c,i)/(σ_c,i + eps)·σ_s,i + μ_s,i
    per_dim:   stats over tokens of dim d (N may differ):  (c − μ_c,d)/(σ_c,d + eps)·σ_s,d + μ_s,d
    """
    require_choice("adain mode", mode, ADAIN_MODES)
    axis = ADAIN_AXES[mode]
    _check_pair("content", content, "style", style, same_length=(axis == -1))
    w = _token_weight("weight", weight, content)
    c, s = content.float(), style.to(content.device).float()
    c_mean, s_mean = c.mean(dim=axis, keepdim=True), s.mean(dim=axis, keepdim=True)
    c_std = (c - c_mean).square().mean(dim=axis, keepdim=True).sqrt()
    s_std = (s - s_mean).square().mean(dim=axis, keepdim=True).sqrt()
    result = (c - c_mean) / (c_std + eps) * s_std + s_mean
    return _pinned(w, content, result, _lerp(c, result, w))
