"""Gram-matrix matching: optimise a conditioning so its token second moments match the VL reference's."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checks import require_finite, require_tokens, require_width
from .steer import token_rms

Progress = Callable[[int, int, float], None]   # (step, total steps, loss)


@dataclass(frozen=True)
class GramSettings:
    """steps: most Adam steps; lr: Adam learning rate relative to the text's RMS; seed: init jitter's seed;
    init_noise: N(0, init_noise²)·rms(text) added to the start (0 = start exactly at the text);
    patience / tolerance: stop when the best loss improved by less than tolerance (relative) for patience steps."""

    steps: int = 200
    lr: float = 0.01
    style_weight: float = 1.0
    content_weight: float = 1.0
    seed: int = 0
    init_noise: float = 0.0
    patience: int = 20
    tolerance: float = 1e-4

    def __post_init__(self):
        for name in ("steps", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"gram {name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "style_weight", "content_weight", "init_noise", "tolerance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"gram {name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0 or self.style_weight + self.content_weight == 0:
            raise ValueError("gram lr and at least one of style_weight / content_weight must be > 0")


@dataclass(frozen=True)
class GramResult:
    conditioning: torch.Tensor         # [B, N, D], the text's dtype and device
    losses: tuple[float, ...]          # total loss before each step, then after the last one
    steps_run: int
    stopped_early: bool


def gram(x: torch.Tensor) -> torch.Tensor:
    """G = x̂ᵀx̂ / N per batch row [B, D, D], x̂ = x / rms(x) per token.

    Per-token RMS normalisation first because Z-Image's caption embedder starts with a per-token RMSNorm:
    a token's overall scale never reaches the DiT, so only the normalised second moments are matched.
    """
    xhat = x.float() / token_rms(x)
    return xhat.transpose(1, 2) @ xhat / x.shape[1]


def gram_loss(c: torch.Tensor, text: torch.Tensor, target_gram: torch.Tensor, style_weight: float,
              content_weight: float) -> torch.Tensor:
    """L = w_s·‖G(c) − G_vl‖² / ‖G_vl‖² + w_c·‖c − t‖² / ‖t‖² (relative squared errors, so the weights compare)."""
    style = (gram(c) - target_gram).square().sum() / target_gram.square().sum().clamp_min(1e-12)
    content = (c - text).square().sum() / text.square().sum().clamp_min(1e-12)
    return style_weight * style + content_weight * content


def _check_inputs(text: torch.Tensor, vl: torch.Tensor) -> None:
    require_tokens("text conditioning", text)
    require_tokens("VL", vl)
    require_width("VL", vl.shape[-1], "text conditioning", text.shape[-1])
    if vl.shape[0] not in (1, text.shape[0]):
        raise ValueError(f"VL batch {vl.shape[0]} does not match text conditioning batch {text.shape[0]} (or 1)")
    require_finite("text conditioning", text)
    require_finite("VL", vl)


def gram_match(text: torch.Tensor, vl: torch.Tensor, settings: GramSettings = GramSettings(),
               device: torch.device | str | None = None, progress: Progress | None = None) -> GramResult:
    """argmin_c L(c) (see gram_loss) by Adam from c₀ = text (+ seeded jitter), on `device` (default text's).

    Deterministic for a fixed seed and device; stops early on a plateau (settings.patience / tolerance).
    """
    _check_inputs(text, vl)
    device = torch.device(device) if device is not None else text.device
    with torch.inference_mode(False), torch.enable_grad():   # hosts run nodes under inference mode
        c, losses, stopped = _adam(text.detach().to(device=device, dtype=torch.float32).clone(),
                                   gram(vl.detach().to(device=device, dtype=torch.float32).clone()), settings, progress)
    out = c.detach().to(device=text.device, dtype=text.dtype)
    require_finite("gram-matched conditioning", out)
    return GramResult(conditioning=out, losses=tuple(losses), steps_run=len(losses) - (0 if stopped else 1),
                      stopped_early=stopped)


def _adam(t: torch.Tensor, target: torch.Tensor, settings: GramSettings, progress: Progress | None):
    """The optimiser loop: (c, losses, stopped early?)."""
    scale = float(token_rms(t).mean())
    start = t.clone()
    if settings.init_noise > 0:
        g = torch.Generator(device="cpu").manual_seed(int(settings.seed))
        start += settings.init_noise * scale * torch.randn(t.shape, generator=g).to(t.device)
    c = start.requires_grad_(True)
    opt = torch.optim.Adam([c], lr=settings.lr * scale)
    losses, best, since_best = [], math.inf, 0
    for step in range(settings.steps):
        opt.zero_grad(set_to_none=True)
        loss = gram_loss(c, t, target, settings.style_weight, settings.content_weight)
        value = float(loss.detach())
        losses.append(value)
        if progress is not None:
            progress(step, settings.steps, value)
        if value < best * (1 - settings.tolerance):
            best, since_best = value, 0
        else:
            since_best += 1
            if since_best >= settings.patience:
                return c.detach(), losses, True
        loss.backward()
        opt.step()
    losses.append(float(gram_loss(c, t, target, settings.style_weight, settings.content_weight).detach()))
    return c.detach(), losses, False


def gram_report(result: GramResult, settings: GramSettings) -> str:
    """Start / end loss, steps run, whether the plateau stopped it."""
    first, last = result.losses[0], result.losses[-1]
    return "\n".join([
        f"gram matching: {result.steps_run} of {settings.steps} Adam steps"
        + (" (stopped early: loss plateau)" if result.stopped_early else ""),
        f"loss {first:.6g} -> {last:.6g} ({(1 - last / first) * 100 if first else 0:.1f}% lower)",
        f"style_weight {settings.style_weight:g}, content_weight {settings.content_weight:g}, lr {settings.lr:g} "
        f"(x text RMS), seed {settings.seed}, init_noise {settings.init_noise:g}",
    ])

