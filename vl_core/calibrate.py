"""A closed-form map from Qwen3-VL hidden space to Z-Image's Qwen3-4B text space, fitted on text-only prompts."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .checks import require_choice, require_finite, require_width
from .layer_mix import mix_label, same_mix
from .types import VLEmbeds

# Relative ridge strengths tried on the held-out prompts; λ is scaled by the mean input variance, so the
# grid is the same for every model. 0 (plain least squares) is tried only with more tokens than dims.
LAMBDAS = (0.0, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HELD_OUT_EVERY = 5            # every 5th prompt is held out to choose λ and report the error
SKIP_FIRST_TOKENS = 1         # <|im_start|>: the attention-sink token, huge-norm in both models, is not fitted


@dataclass(frozen=True)
class VLCalibration:
    """y = x·W + b per token (affine: W diagonal, stored as its diagonal [D]; linear: W [D, D]).

    vl_layers / num_layers: the VL encode layers it was fitted at, vl_layer_weights their mix ({layer: w}, None =
    mixed equally; vl_core.layer_mix); text_layer: the text encoder's layer label.
    held_out: metrics on held-out prompts of the map and of the identity map (rel_error = ‖ŷ − y‖/‖y‖,
    cosine = mean per-token cos(ŷ, y)); lam: the relative ridge strength chosen there.
    """

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor
    vl_layers: tuple[int, ...]
    num_layers: int
    text_layer: str
    lam: float
    held_out: dict = field(default_factory=dict)
    num_prompts: int = 0
    num_tokens: int = 0
    warnings: tuple[str, ...] = ()
    vl_layer_weights: dict[int, float] | None = None

    @property
    def width(self) -> int:
        return int(self.bias.shape[-1])

    def layer_labels(self) -> str:
        return mix_label(self.vl_layers, self.vl_layer_weights, self.num_layers)

    def map(self, x: torch.Tensor) -> torch.Tensor:
        """ŷ = x·W + b (x [..., D], float32 math, x's dtype back)."""
        return _apply(self.kind, self.weight.to(x.device), self.bias.to(x.device), x.float()).to(x.dtype)


def _moments(x: torch.Tensor, y: torch.Tensor):
    """Means and centred copies, float64."""
    mx, my = x.mean(dim=0), y.mean(dim=0)
    return mx, my, x - mx, y - my


def _fit_affine(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per dim d: a_d = cov(x_d, y_d) / (var(x_d) + λ·mean_d var), b_d = ȳ_d − a_d·x̄_d."""
    mx, my, xc, yc = _moments(x, y)
    var = xc.square().mean(dim=0)
    a = (xc * yc).mean(dim=0) / (var + lam * var.mean()).clamp_min(1e-30)
    return a, my - a * mx


def _fit_linear(x: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge: W = (XcᵀXc + λ·s·I)⁻¹ XcᵀYc, s = tr(XcᵀXc)/D, b = ȳ − x̄·W (X, Y centred; a pseudo-inverse at λ = 0)."""
    mx, my, xc, yc = _moments(x, y)
    gram = xc.T @ xc
    s = torch.diagonal(gram).mean()
    evals, evecs = torch.linalg.eigh(gram)
    denom = evals + lam * s
    keep = denom > denom.max() * 1e-12
    inv = torch.where(keep, 1.0 / denom.clamp_min(1e-300), torch.zeros_like(denom))
    w = evecs @ (inv[:, None] * (evecs.T @ (xc.T @ yc)))
    return w, my - mx @ w


FITS = {"affine": _fit_affine, "linear": _fit_linear}
MAPS = {"affine": lambda x, w, b: x * w + b, "linear": lambda x, w, b: x @ w + b}   # ŷ per kind


def _apply(kind: str, w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return MAPS[kind](x, w, b)


def map_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """rel_error = ‖pred − target‖_F / ‖target‖_F; cosine = mean over tokens of cos(pred_t, target_t)."""
    rel = float((pred - target).norm() / target.norm().clamp_min(1e-30))
    cos = torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-12).mean()
    return {"rel_error": rel, "cosine": float(cos)}


def _check_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if len(pairs) < 2:
        raise ValueError(f"calibration needs at least 2 aligned prompts (got {len(pairs)}): add prompts, or check "
                         "that the two encoders tokenize them alike (dropped prompts are reported)")
    width_x = pairs[0][0].shape[-1]
    for i, (x, y) in enumerate(pairs):
        if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"prompt #{i + 1}: VL tokens {tuple(x.shape)} and text tokens {tuple(y.shape)} are not "
                             "aligned [N, D] pairs (the two encoders' token ids must agree)")
        require_width(f"prompt #{i + 1} VL", x.shape[-1], "the first VL", width_x)
        require_width(f"prompt #{i + 1} text", y.shape[-1], "VL", width_x,
                      hint="use Qwen3-VL-4B with Z-Image's Qwen3-4B text encoder (both 2560-d)")
        require_finite(f"prompt #{i + 1} VL tokens", x)
        require_finite(f"prompt #{i + 1} text tokens", y)


def _stack(pairs) -> tuple[torch.Tensor, torch.Tensor]:
    xs = [x[SKIP_FIRST_TOKENS:] if x.shape[0] > SKIP_FIRST_TOKENS else x for x, _ in pairs]
    ys = [y[SKIP_FIRST_TOKENS:] if y.shape[0] > SKIP_FIRST_TOKENS else y for _, y in pairs]
    return torch.cat(xs).double(), torch.cat(ys).double()


def fit_calibration(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], kind: str, vl_layers: Sequence[int],
                    num_layers: int, text_layer: str = "-2",
                    vl_layer_weights: dict[int, float] | None = None) -> VLCalibration:
    """Fit y ≈ x·W + b on token-aligned (VL [N_i, D], text [N_i, D]) prompt pairs (see FITS for the two kinds).

    λ ∈ LAMBDAS is chosen on every HELD_OUT_EVERY-th prompt (fit on the rest), then the map is refitted on all
    prompts with that λ. Fewer tokens than dims: λ = 0 is skipped for the linear map and a warning recorded.
    """
    require_choice("calibration kind", kind, tuple(FITS))
    _check_pairs(pairs)
    held_idx = {i for i in range(len(pairs)) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1} or {len(pairs) - 1}
    held = [p for i, p in enumerate(pairs) if i in held_idx]
    train = [p for i, p in enumerate(pairs) if i not in held_idx]
    x_train, y_train = _stack(train)
    x_held, y_held = _stack(held)
    width = x_train.shape[-1]
    warnings, lambdas = [], LAMBDAS
    if kind == "linear" and x_train.shape[0] <= width:
        lambdas = tuple(lam for lam in LAMBDAS if lam >= 1e-3)
        warnings.append(f"only {x_train.shape[0]} training tokens for {width} dims: the full linear map is "
                        f"under-determined, so it is ridge-regularised (λ >= {lambdas[0]:g}); add prompts "
                        "(or use kind 'affine') for a better-posed fit")
    scores = {}
    for lam in lambdas:
        w, b = FITS[kind](x_train, y_train, lam)
        scores[lam] = map_metrics(_apply(kind, w, b, x_held), y_held)
    lam = min(scores, key=lambda k: (scores[k]["rel_error"], -k))
    x_all, y_all = _stack(pairs)
    w, b = FITS[kind](x_all, y_all, lam)
    held_out = {"map": scores[lam], "identity": map_metrics(x_held, y_held), "prompts": len(held),
                "lambda_scores": {f"{k:g}": v["rel_error"] for k, v in scores.items()}}
    return VLCalibration(kind=kind, weight=w.float(), bias=b.float(), vl_layers=tuple(int(v) for v in vl_layers),
                         num_layers=int(num_layers), text_layer=str(text_layer), lam=float(lam), held_out=held_out,
                         num_prompts=len(pairs), num_tokens=int(x_all.shape[0]), warnings=tuple(warnings),
                         vl_layer_weights=None if vl_layer_weights is None else
                         {int(k): float(v) for k, v in sorted(vl_layer_weights.items())})


def check_calibration_for(cal: VLCalibration, vl: VLEmbeds) -> None:
    """ValueError unless the map was fitted at this encode's width, layers and layer weights."""
    if not isinstance(cal, VLCalibration):
        raise ValueError(f"calibration must come from a Fit Calibration node, got {type(cal).__name__}")
    require_width("calibration", cal.width, "vl_embeds", vl.width,
                  hint="fit the calibration with the same Qwen3-VL model that encoded the reference")
    if tuple(vl.layers) != cal.vl_layers:
        raise ValueError(f"the calibration was fitted at VL layer(s) {list(cal.vl_layers)} but vl_embeds holds "
                         f"{vl.layers}: encode with the calibration's layers, or fit one at these")
    if not same_mix(vl.layers, vl.stored_layer_weights(), cal.vl_layers, cal.vl_layer_weights):
        raise ValueError(f"the calibration was fitted at the layer mix {cal.layer_labels()} but vl_embeds mixes "
                         f"{mix_label(vl.layers, vl.stored_layer_weights(), vl.num_layers)}: encode with the "
                         "calibration's layers (and weights), or fit one at these")


def apply_calibration(cal: VLCalibration, vl: VLEmbeds, image_only: bool = True) -> VLEmbeds:
    """h' = h·W + b at every stored layer, on the image tokens only (image_only) or on all tokens; with Σ_l w_l = 1
    the stored mix reads Σ_l w_l·(h_l·W + b) = (Σ_l w_l·h_l)·W + b, the map of the mix it was fitted on."""
    check_calibration_for(cal, vl)
    mask = vl.image_mask()
    if image_only and not bool(mask.any()):
        raise ValueError("vl_embeds has no image tokens to calibrate (token_mode 'text'?): set image_only off or "
                         "encode with token_mode 'full' or 'image'")
    hidden = {}
    for layer, t in vl.hidden.items():
        mapped = cal.map(t)
        hidden[layer] = torch.where(mask.to(t.device)[None, :, None], mapped, t) if image_only else mapped
    return vl.with_hidden(hidden)


def calibration_report(cal: VLCalibration, dropped: int = 0, total: int | None = None) -> str:
    """Kind, λ, the held-out error and cosine of the map and of the identity, warnings."""
    m, ident = cal.held_out.get("map", {}), cal.held_out.get("identity", {})
    total = cal.num_prompts + dropped if total is None else total
    lines = [
        f"calibration: {cal.kind}, λ = {cal.lam:g} (chosen on {cal.held_out.get('prompts', 0)} held-out prompts)",
        f"prompts used: {cal.num_prompts} of {total} ({dropped} dropped: token ids differ between the encoders), "
        f"{cal.num_tokens} tokens, width {cal.width}",
        f"VL layer(s) {cal.layer_labels()} -> text layer {cal.text_layer}",
        f"held-out relative error: map {m.get('rel_error', math.nan):.4f}, identity "
        f"{ident.get('rel_error', math.nan):.4f}",
        f"held-out mean cosine:    map {m.get('cosine', math.nan):.4f}, identity {ident.get('cosine', math.nan):.4f}",
        "λ tried (held-out rel. error): " + ", ".join(f"{k}: {v:.4f}" for k, v in
                                                      cal.held_out.get("lambda_scores", {}).items()),
    ]
    return "\n".join(lines + [f"warning: {w}" for w in cal.warnings])


def load_prompts(path: str) -> list[str]:
    """Non-empty, non-comment (#) lines of a UTF-8 text file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
