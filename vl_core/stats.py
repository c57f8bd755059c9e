"""Per-dimension statistics of hidden states and two-sided detection/masking of outlier dimensions."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .checks import require_choice, require_finite, require_tokens, require_width

if TYPE_CHECKING:
    from .types import VLEmbeds

EPS = 1e-6
CLAMP_SIGMAS = 3.0


@dataclass(frozen=True)
class DimStats:
    """Per-dimension mean and population std (float32, [D]) over `count` token positions."""

    mean: torch.Tensor
    std: torch.Tensor
    count: int

    @property
    def width(self) -> int:
        return self.mean.shape[-1]


def dim_stats(x: torch.Tensor, token_mask: torch.Tensor | None = None) -> DimStats:
    """Per-dim stats over all (batch, token) positions, or only where `token_mask` ([N] or [B, N]) is True.

    μ_d = mean_p x_{p,d};  σ_d = sqrt(mean_p (x_{p,d} − μ_d)²)  (population std, float32).
    """
    require_tokens("x", x)
    b, n, d = x.shape
    if token_mask is None:
        sel = x.reshape(b * n, d)
    else:
        mask = torch.as_tensor(token_mask, device=x.device)
        if mask.dtype != torch.bool:
            raise ValueError(f"token_mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) == (n,):
            sel = x[:, mask].reshape(-1, d)
        elif tuple(mask.shape) == (b, n):
            sel = x[mask]
        else:
            raise ValueError(f"token_mask must have shape [{n}] or [{b}, {n}] to match x {tuple(x.shape)}, "
                             f"got {tuple(mask.shape)}")
        if sel.shape[0] == 0:
            raise ValueError("token_mask selects no tokens: statistics need at least one token "
                             "(check the image/prompt spans)")
    require_finite("x", sel)
    sel = sel.float()
    mean = sel.mean(dim=0)
    std = (sel - mean).square().mean(dim=0).sqrt()
    return DimStats(mean=mean, std=std, count=int(sel.shape[0]))


def std_ratio(vl: DimStats, ref: DimStats, eps: float = EPS) -> torch.Tensor:
    """Per-dim loudness of VL relative to the reference: r_d = (σ_vl,d + eps) / (σ_ref,d + eps)."""
    require_width("VL stats", vl.width, "reference stats", ref.width)
    return (vl.std.float() + eps) / (ref.std.float().to(vl.std.device) + eps)


def find_outliers(ratio: torch.Tensor, threshold: float) -> torch.Tensor:
    """Two-sided outlier dims: r_d > t  OR  r_d < 1/t  (t > 1), so both louder and quieter dims are caught."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 1):
        raise ValueError(f"threshold must be a finite number > 1 (a std ratio factor, e.g. 10), got {threshold!r}")
    require_finite("ratio", ratio)
    if bool((ratio <= 0).any()):
        raise ValueError("ratio must be positive (a std ratio from std_ratio), got values <= 0")
    return (ratio > threshold) | (ratio < 1.0 / threshold)


def _replace_zero(xf, vl, ref, eps):
    return torch.zeros_like(xf)


def _replace_clamp(xf, vl, ref, eps):
    r_mean, r_std = ref.mean.float().to(xf.device), ref.std.float().to(xf.device)
    return torch.minimum(torch.maximum(xf, r_mean - CLAMP_SIGMAS * r_std), r_mean + CLAMP_SIGMAS * r_std)


def _replace_scale(xf, vl, ref, eps):
    r_mean, r_std = ref.mean.float().to(xf.device), ref.std.float().to(xf.device)
    v_mean, v_std = vl.mean.float().to(xf.device), vl.std.float().to(xf.device)
    return (xf - v_mean) * (r_std / (v_std + eps)) + r_mean


REPLACEMENTS = {"zero": _replace_zero, "clamp": _replace_clamp, "scale": _replace_scale}  # (x, vl, ref, eps) → x'
OUTLIER_MODES = ("none", *REPLACEMENTS)  # "none": x unchanged


def mask_outliers(x: torch.Tensor, outliers: torch.Tensor, mode: str, vl: DimStats, ref: DimStats,
                  eps: float = EPS) -> torch.Tensor:
    """Replace outlier dims of x; non-outlier dims are returned bit-identical.

    zero: 0;  clamp: clip(x_d, μ_ref,d ± 3σ_ref,d);  scale: (x_d − μ_vl,d)·σ_ref,d/(σ_vl,d+eps) + μ_ref,d;  none: x.
    """
    require_choice("mask mode", mode, OUTLIER_MODES)
    require_tokens("x", x)
    d = x.shape[-1]
    require_width("x", d, "reference stats", ref.width)
    require_width("x", d, "VL stats", vl.width)
    outliers = torch.as_tensor(outliers, device=x.device)
    if outliers.dtype != torch.bool or tuple(outliers.shape) != (d,):
        raise ValueError(f"outliers must be a bool tensor [{d}] (from find_outliers), got "
                         f"{outliers.dtype} {tuple(outliers.shape)}")
    if mode == "none" or not bool(outliers.any()):
        return x
    new = REPLACEMENTS[mode](x.float(), vl, ref, eps)
    return torch.where(outliers, new.to(x.dtype), x)


def _fmt_ratio(r: float) -> str:
    if r >= 100:
        return f"{r:.0f}"
    if r >= 0.01:
        return f"{r:.2f}"
    return f"{r:.2g}"


def outlier_report(ratio: torch.Tensor, outliers: torch.Tensor, top_k: int = 8) -> str:
    """Human-readable summary: counts of louder (r>1) / quieter (r<1) outlier dims, then the top-k dims by |log r|."""
    ratio = ratio.detach().float().cpu()
    outliers = torch.as_tensor(outliers).cpu().bool()
    if ratio.ndim != 1 or outliers.shape != ratio.shape:
        raise ValueError(f"ratio and outliers must both be [D], got {tuple(ratio.shape)} and {tuple(outliers.shape)}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    louder = int((outliers & (ratio > 1)).sum())
    quieter = int((outliers & (ratio < 1)).sum())
    lines = [f"{louder + quieter} outlier dims of {ratio.numel()}: {louder} louder, {quieter} quieter "
             f"(VL std / reference std)"]
    k = min(top_k, ratio.numel())
    if k:
        order = torch.argsort(ratio.clamp_min(1e-30).log().abs(), descending=True, stable=True)[:k]
        lines.append(f"top {k} dims by |log ratio|:")
        for i in order.tolist():
            r = float(ratio[i])
            if r >= 1:
                rel = f"{_fmt_ratio(r)}× louder"
            else:
                rel = f"{_fmt_ratio(1 / r)}× quieter"
            flag = " [outlier]" if bool(outliers[i]) else ""
            lines.append(f"  dim {i}: {_fmt_ratio(r)}× ({rel}){flag}")
    return "\n".join(lines)


def suppress_image_outliers(embeds: "VLEmbeds", threshold: float, mode: str) -> "VLEmbeds":
    """Per stored layer: find_outliers(std_ratio(image tokens, non-image tokens), t) and mask_outliers on the
    image tokens only (non-image tokens and non-outlier dims bit-identical); mode "none" returns embeds as is.

    The outlier dims per layer are recorded in extra["outlier_dims"] = {str(layer): [dims]}.
    """
    require_choice("outlier mode", mode, OUTLIER_MODES)
    if mode == "none":
        return embeds
    image = embeds.image_mask()
    if not bool(image.any()) or bool(image.all()):
        raise ValueError(f"outlier_mode {mode!r} needs both image and text tokens to compare (this encode has "
                         f"{int(image.sum())} image tokens of {embeds.num_tokens}): set outlier_mode to 'none'")
    hidden, found = {}, {}
    for layer, x in embeds.hidden.items():
        mask = image.to(x.device)
        vl, ref = dim_stats(x, mask), dim_stats(x, ~mask)
        outliers = find_outliers(std_ratio(vl, ref), threshold)
        masked = mask_outliers(x, outliers, mode, vl, ref)
        hidden[layer] = torch.where(mask[None, :, None], masked, x)
        found[str(layer)] = outliers.nonzero().flatten().tolist()
    return embeds.with_hidden(hidden, extra={**embeds.extra, "outlier_dims": found})
