"""Match the statistics of VL hidden states to those of a reference (e.g. Qwen3-4B text conditioning)."""
from __future__ import annotations

import torch

from .checks import require_choice, require_finite, require_tokens, require_width
from .stats import EPS, DimStats, dim_stats


def global_moments(s: DimStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar mean/std of all elements pooled from per-dim stats (each dim has the same count).

    μ̄ = mean_d μ_d;  σ̄ = sqrt(mean_d (σ_d² + (μ_d − μ̄)²))   (law of total variance).
    """
    mean = s.mean.float()
    g_mean = mean.mean()
    g_std = (s.std.float().square() + (mean - g_mean).square()).mean().sqrt()
    return g_mean, g_std


def rms_std(s: DimStats) -> torch.Tensor:
    """RMS over dims of the per-dim std: σ̄ = sqrt(mean_d σ_d²)."""
    return s.std.float().square().mean().sqrt()


def _global(xf: torch.Tensor, xs: DimStats, ref: DimStats, eps: float) -> torch.Tensor:
    dev = xf.device
    x_mean, x_std = global_moments(xs)
    r_mean, r_std = global_moments(ref)
    return (xf - x_mean.to(dev)) / (x_std.to(dev) + eps) * r_std.to(dev) + r_mean.to(dev)


def _per_dim(xf: torch.Tensor, xs: DimStats, ref: DimStats, eps: float) -> torch.Tensor:
    dev = xf.device
    return (xf - xs.mean.float().to(dev)) / (xs.std.float().to(dev) + eps) \
        * ref.std.float().to(dev) + ref.mean.float().to(dev)


def _hybrid(xf: torch.Tensor, xs: DimStats, ref: DimStats, eps: float) -> torch.Tensor:
    dev = xf.device
    scale = rms_std(ref).to(dev) / (rms_std(xs).to(dev) + eps)
    return (xf - xs.mean.float().to(dev)) * scale + ref.mean.float().to(dev)


RESTANDARDISE = {"global": _global, "per_dim": _per_dim, "hybrid": _hybrid}  # method → (x, x_stats, ref, eps) → x'
NORMALIZE_METHODS = ("none", *RESTANDARDISE)  # "none": x unchanged


def normalize_to_reference(x: torch.Tensor, ref: DimStats, method: str,
                           x_stats: DimStats | None = None, eps: float = EPS) -> torch.Tensor:
    """Re-standardise x [B, N, D] to the reference statistics (x_stats defaults to dim_stats(x)).

    none:    x
    global:  (x − μ̄_x)/(σ̄_x+eps)·σ̄_ref + μ̄_ref   with scalar μ̄, σ̄ pooled over all elements (global_moments)
    per_dim: (x − μ_x,d)/(σ_x,d+eps)·σ_ref,d + μ_ref,d
    hybrid:  (x − μ_x,d)·σ̄_ref/(σ̄_x+eps) + μ_ref,d   with σ̄ = sqrt(mean_d σ_d²) (rms_std);
             one scale for all dims, so the relative loudness of dims is kept
    """
    require_choice("normalize method", method, NORMALIZE_METHODS)
    require_tokens("x", x)
    require_width("x", x.shape[-1], "reference stats", ref.width)
    if method == "none":
        return x
    require_finite("x", x)
    require_finite("reference stats mean", ref.mean)
    require_finite("reference stats std", ref.std)
    if x_stats is None:
        x_stats = dim_stats(x)
    require_width("x", x.shape[-1], "x_stats", x_stats.width)
    return RESTANDARDISE[method](x.float(), x_stats, ref, eps).to(x.dtype)
