"""Steering directions from contrastive VL encodes (CAA / RepE), applying them to conditioning, composing them."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checks import require_choice, require_finite, require_same_encoding, require_tokens, require_width
from .layer_mix import mix_label, require_same_mix, same_mix
from .pooling import match_length
from .stats import EPS
from .types import VLEmbeds


@dataclass(frozen=True)
class VLDirection:
    """A steering direction in Qwen3-VL hidden space.

    vector:   Tensor[K, D] float32, unit RMS row norm: sqrt(mean_k |v_k|²) = 1 (K = 1: one unit vector;
              K > 1: one row per pooled token position).
    scale:    sqrt(mean_k |raw_k|²) of the raw estimate before normalisation (how far apart the sets are).
    layers:   resolved hidden-state layers the encodes were read at; num_layers: the source model depth;
              layer_weights: {layer: w} of a weighted layer mix (vl_core.layer_mix), None = mixed equally.
    method:   estimator ("mean_diff" | "pca" | "combined"); pairs: contrastive pairs it came from.
    explained_variance: share of the paired differences' energy along the first principal component.
    agreement: cos(d_i, mean d) per pair (does every pair point the same way?).
    """

    vector: torch.Tensor
    scale: float
    layers: tuple[int, ...]
    num_layers: int
    method: str
    pairs: int = 0
    explained_variance: float = float("nan")
    agreement: tuple[float, ...] = ()
    prompt: str = ""
    layer_weights: dict[int, float] | None = None

    @property
    def width(self) -> int:
        return int(self.vector.shape[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.vector.shape[0])

    def layer_labels(self) -> str:
        return mix_label(self.layers, self.layer_weights, self.num_layers)


def token_rms(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-token RMS, keepdim: sqrt(mean_d x_d² + eps)."""
    return torch.sqrt(x.float().square().mean(dim=-1, keepdim=True) + eps)


ZERO_ESTIMATE = ("the positive and negative sets encode identically (difference is zero): use images that "
                 "differ in the property you want to steer")
ZERO_COMBINATION = "the weighted directions cancel out (sum is zero): change the weights"


def _unit_rms_rows(raw: torch.Tensor, zero_message: str = ZERO_ESTIMATE) -> tuple[torch.Tensor, float]:
    """(raw / s, s) with s = sqrt(mean_k |raw_k|²); refuses an all-zero result."""
    scale = float(raw.square().sum(dim=-1).mean().sqrt())
    if not scale > 1e-12 or not math.isfinite(scale):
        raise ValueError(zero_message)
    return raw / scale, scale


def _mean_diff(diffs: torch.Tensor) -> torch.Tensor:
    """CAA: d = mean_i (pos_i − neg_i), diffs [P, K·D] → [K·D]."""
    return diffs.mean(dim=0)


def _first_pc(diffs: torch.Tensor) -> torch.Tensor:
    """RepE: first right singular vector of the (uncentred) paired differences, sign along mean_i d_i, × σ₁/√P."""
    _, s, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    v = vh[0].float()
    if float(v @ diffs.mean(dim=0)) < 0:
        v = -v
    return v * float(s[0]) / math.sqrt(diffs.shape[0])


ESTIMATORS = {"mean_diff": _mean_diff, "pca": _first_pc}


def _explained_variance(diffs: torch.Tensor) -> float:
    """σ₁² / Σσ² of the uncentred paired differences (1 = every pair differs along one line)."""
    s = torch.linalg.svdvals(diffs.double())
    total = float(s.square().sum())
    return float(s[0] ** 2 / total) if total > 0 else float("nan")


def _cosines(rows: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """cos(row_i, ref) for rows [P, M], ref [M]."""
    return (rows @ ref) / (rows.norm(dim=-1) * ref.norm()).clamp_min(EPS)


def _pooled(name: str, embeds: Sequence[VLEmbeds], num_tokens: int) -> torch.Tensor:
    """[P, K, D]: each encode's tokens (its stored layer mix, batch row 0) area-pooled to K tokens."""
    out = []
    for i, e in enumerate(embeds):
        tokens = e.tokens().float()[:1]
        require_finite(f"{name} #{i + 1}", tokens)
        out.append(match_length(tokens, num_tokens, "pool")[0])
    return torch.stack(out)


def _check_sets(positives: Sequence[VLEmbeds], negatives: Sequence[VLEmbeds]) -> None:
    if not positives or not negatives:
        raise ValueError(f"steering needs images in both sets (got {len(positives)} positive, {len(negatives)} "
                         "negative): give each set at least one image")
    if len(positives) != len(negatives):
        raise ValueError(f"{len(positives)} positive but {len(negatives)} negative images: the sets are paired, "
                         "give both the same number of images (pair i = positive i vs negative i)")
    first = positives[0]
    for name, group in (("positive", positives), ("negative", negatives)):
        for i, e in enumerate(group):
            require_same_encoding(f"{name} #{i + 1}", e, "positive #1", first, what="both sets")
            require_same_mix(f"{name} #{i + 1}", e, "positive #1", first, what="both sets")


def steering_direction(positives: Sequence[VLEmbeds], negatives: Sequence[VLEmbeds], method: str = "mean_diff",
                       num_tokens: int = 1) -> VLDirection:
    """Direction from paired encodes, d_i = pool_K(pos_i) − pool_K(neg_i) flattened to [K·D]:

    mean_diff (CAA): v = mean_i d_i;  pca (RepE): v = first principal direction of {d_i} (uncentred SVD).
    The result is stored unit-RMS over its K rows, with its scale, explained variance and per-pair agreement.
    """
    require_choice("direction method", method, tuple(ESTIMATORS))
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an integer >= 1 (1 = one vector), got {num_tokens!r}")
    _check_sets(positives, negatives)
    pos, neg = _pooled("positive", positives, num_tokens), _pooled("negative", negatives, num_tokens)
    diffs = (pos - neg).reshape(len(positives), -1)
    raw = ESTIMATORS[method](diffs).reshape(num_tokens, -1)
    vector, scale = _unit_rms_rows(raw)
    mean = diffs.mean(dim=0)
    first = positives[0]
    return VLDirection(vector=vector, scale=scale, layers=tuple(first.layers), num_layers=first.num_layers,
                       method=method, pairs=len(positives), explained_variance=_explained_variance(diffs),
                       agreement=tuple(float(c) for c in _cosines(diffs, mean)), prompt=first.prompt,
                       layer_weights=first.stored_layer_weights())


def require_direction(name: str, direction) -> VLDirection:
    """ValueError unless `direction` is a VLDirection."""
    if not isinstance(direction, VLDirection):
        raise ValueError(f"{name} must come from a Steering Direction node, got {type(direction).__name__}")
    return direction


def check_direction_for(direction: VLDirection, width: int, name: str = "direction") -> None:
    """ValueError unless the direction is a VLDirection of this hidden width."""
    require_direction(name, direction)
    require_width(name, direction.width, "conditioning", width,
                  hint="estimate the direction with Qwen3-VL-4B (same width as Z-Image's text encoder)")


def apply_directions(cond: torch.Tensor, directions: Sequence[tuple[VLDirection, float]]) -> torch.Tensor:
    """c'_t = c_t + Σ_j s_j · rms(c_t) · v̂_jt, v̂_jt = v_jt / rms(v_jt) (rows pooled/repeated to N tokens).

    Relative to each token's RMS because Z-Image's caption embedder starts with a per-token RMSNorm: only the
    direction's size relative to the token survives. s = 1 adds a step as loud as the token itself.
    """
    require_tokens("conditioning", cond)
    out = cond.float()
    rms = token_rms(out)
    for i, (direction, strength) in enumerate(directions):
        check_direction_for(direction, cond.shape[-1], f"direction #{i + 1}")
        if strength == 0:
            continue
        v = match_length(direction.vector.float()[None].to(cond.device), cond.shape[1], "pool")
        out = out + float(strength) * rms * v / token_rms(v)
    return out


def _check_compatible(directions: Sequence[VLDirection]) -> None:
    if not directions:
        raise ValueError("no directions to combine: connect at least one VL_DIRECTION")
    first = directions[0]
    for i, d in enumerate(directions):
        check_direction_for(d, first.width, f"direction #{i + 1}")
        if (d.layers != first.layers or d.num_tokens != first.num_tokens
                or not same_mix(d.layers, d.layer_weights, first.layers, first.layer_weights)):
            raise ValueError(f"direction #{i + 1} is for layers {d.layer_labels()} with {d.num_tokens} token(s) but "
                             f"#1 is for layers {first.layer_labels()} with {first.num_tokens}: estimate them with "
                             "the same layers (and layer weights) and num_tokens")


def _gram_schmidt(rows: torch.Tensor) -> torch.Tensor:
    """u_j = v_j − Σ_{i<j} (v_j·u_i / u_i·u_i) u_i, in order (the first direction is kept as is)."""
    out = []
    for v in rows:
        for u in out:
            v = v - (v @ u) / (u @ u).clamp_min(EPS) * u
        out.append(v)
    return torch.stack(out)


def combine_directions(directions: Sequence[VLDirection], weights: Sequence[float],
                       orthogonalize: bool = False) -> tuple[VLDirection, str]:
    """v = Σ_j w_j · u_j (u = the unit directions, Gram–Schmidt-orthogonalised in order when asked), renormalised;
    scale = Σ_j |w_j|·scale_j. The report gives the inputs' pairwise cosines, explained variance, pair agreement.
    """
    _check_compatible(directions)
    if len(weights) != len(directions):
        raise ValueError(f"{len(weights)} weights for {len(directions)} directions: give one weight each")
    rows = torch.stack([d.vector.float().reshape(-1) for d in directions])
    units = rows / rows.norm(dim=-1, keepdim=True)
    cos = units @ units.T
    basis = _gram_schmidt(units) if orthogonalize else units
    w = torch.tensor([float(x) for x in weights])
    raw = (w[:, None] * basis).sum(dim=0).reshape(directions[0].vector.shape)
    vector, _ = _unit_rms_rows(raw, ZERO_COMBINATION)
    scale = sum(abs(float(x)) * d.scale for x, d in zip(weights, directions))
    first = directions[0]
    combined = VLDirection(vector=vector, scale=scale, layers=first.layers, num_layers=first.num_layers,
                           method="combined", pairs=sum(d.pairs for d in directions), prompt=first.prompt,
                           layer_weights=first.layer_weights)
    lines = [f"combined {len(directions)} direction(s), weights {[float(x) for x in weights]}, "
             f"orthogonalize={orthogonalize}",
             f"explained variance of the inputs' 1st PC: {_explained_variance(units):.3f} (1 = all on one axis)",
             "pairwise cosine:"]
    lines += ["  " + " ".join(f"{float(c):+.3f}" for c in row) for row in cos]
    lines += [f"#{i + 1}: {direction_summary(d)}" for i, d in enumerate(directions)]
    return combined, "\n".join(lines)


def direction_summary(d: VLDirection) -> str:
    """One line: method, pairs, explained variance, agreement range, scale, shape, layers."""
    agree = (f"agreement with mean min {min(d.agreement):+.3f} mean {sum(d.agreement) / len(d.agreement):+.3f}"
             if d.agreement else "agreement -")
    return (f"{d.method}, {d.pairs} pair(s), explained variance of 1st PC {d.explained_variance:.3f}, {agree}, "
            f"scale {d.scale:.4g}, {d.num_tokens}×{d.width}, layers {d.layer_labels()}")


def direction_report(d: VLDirection) -> str:
    """Multi-line report of an estimated direction (the per-pair agreement listed)."""
    lines = [direction_summary(d), "per-pair cos(d_i, mean d): " + ", ".join(f"{a:+.3f}" for a in d.agreement)]
    if d.agreement and min(d.agreement) < 0.3:
        lines.append("warning: some pairs disagree with the mean direction (cos < 0.3): the sets do not differ "
                     "consistently, so the arithmetic may not behave linearly")
    return "\n".join(lines)
