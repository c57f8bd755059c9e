"""Several VL references (and negative ones) combined into one VLEmbeds: concat, average, norm_average."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import require_choice, require_finite, require_same_encoding
from .layer_mix import require_same_mix
from .pooling import match_length
from .types import VLEmbeds

# VLEmbeds.extra key of the concat layout: {"spans": [[start, end), ...], "weights": [...]} per reference,
# JSON-safe so saved embeddings keep it (the file format is unchanged: extra was always saved).
REFERENCES_KEY = "references"


def _rms(x: torch.Tensor) -> torch.Tensor:
    """One scalar per batch row: sqrt(mean over tokens and dims of x²)."""
    return x.square().mean(dim=(1, 2), keepdim=True).sqrt()


def _average(tokens: Sequence[torch.Tensor], w: torch.Tensor, n: int) -> torch.Tensor:
    """Σ_i w_i · pool_n(x_i) / Σ_i w_i."""
    return sum(wi * match_length(x, n, "pool") for wi, x in zip(w, tokens)) / w.sum()


def _norm_average(tokens: Sequence[torch.Tensor], w: torch.Tensor, n: int) -> torch.Tensor:
    """(Σ_i w_i · pool_n(x_i) / r_i / Σ_i w_i) · (Σ_i w_i r_i / Σ_i w_i), r_i = RMS(x_i): equal say per reference."""
    rms = [_rms(x).clamp_min(1e-12) for x in tokens]
    loud = sum(wi * r for wi, r in zip(w, rms)) / w.sum()
    return _average([x / r for x, r in zip(tokens, rms)], w, n) * loud


AVERAGES = {"average": _average, "norm_average": _norm_average}
COMBINE_MODES = ("concat", *AVERAGES)


def _check_refs(name: str, refs: Sequence[VLEmbeds], like: VLEmbeds) -> None:
    for i, r in enumerate(refs):
        if not isinstance(r, VLEmbeds):
            raise ValueError(f"{name} #{i + 1} must come from a VL Encode / Load VL Embeddings node, got "
                             f"{type(r).__name__}")
        require_same_encoding(f"{name} #{i + 1}", r, "reference #1", like, what="every reference")
        # combined per layer, then read through reference #1's stored weights: a reference mixed otherwise
        # would silently be re-weighted, so it is refused
        require_same_mix(f"{name} #{i + 1}", r, "reference #1", like, what="every reference")
        if r.num_tokens < 1:
            raise ValueError(f"{name} #{i + 1} has no tokens: check its token mode")
        for layer, t in r.hidden.items():
            require_finite(f"{name} #{i + 1} (layer {r.layer_label(layer)})", t)


def _weights(weights: Sequence[float], count: int) -> torch.Tensor:
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weight(s) for {count} reference(s): give one weight per reference")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32)
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"reference weights {w.tolist()} must be >= 0 with a positive sum: push away with "
                         "negative references instead of negative weights")
    return w


def _mean_negative(negatives: Sequence[VLEmbeds], layer: int) -> torch.Tensor | None:
    """mean_j pool(neg_j) at one layer, pooled to the first negative's length (None without negatives)."""
    if not negatives:
        return None
    n = negatives[0].num_tokens
    return torch.stack([match_length(r.hidden[layer].float(), n, "pool") for r in negatives]).mean(dim=0)


def _push_away(x: torch.Tensor, negative: torch.Tensor | None, weight: float) -> torch.Tensor:
    """x − w · pool_N(negative) (x unchanged, bit for bit, when w = 0 or there is no negative)."""
    if negative is None or weight == 0:
        return x
    return x - weight * match_length(negative.to(x.device), x.shape[1], "pool")


def _concat_layout(refs: Sequence[VLEmbeds], weights: torch.Tensor) -> dict:
    """Spans, image spans and the extra layout of references laid side by side."""
    spans, image_spans, start = [], [], 0
    for r in refs:
        spans.append([start, start + r.num_tokens])
        image_spans += [(start + s, start + e) for s, e in r.image_spans]
        start += r.num_tokens
    return {"image_spans": tuple(image_spans), "spans": spans, "weights": weights.tolist()}


def combine_references(refs: Sequence[VLEmbeds], weights: Sequence[float], mode: str = "average",
                       negatives: Sequence[VLEmbeds] = (), negative_weight: float = 1.0,
                       num_tokens: int = 0) -> VLEmbeds:
    """One VLEmbeds from several, per stored layer; negatives push away: out = combine(refs) − w_neg·mean(neg).
    Every input must hold the same layers mixed with the same weights (the result keeps reference #1's mix).

    concat:       [r_1 − w_neg·n̄; …; r_k − w_neg·n̄] side by side (n̄ pooled to each span); spans and weights kept
                  in extra["references"] for the injection (the tokens themselves are not scaled).
    average:      Σ w_i·pool_L(r_i) / Σ w_i − w_neg·pool_L(n̄), L = num_tokens or reference #1's count.
    norm_average: as average after dividing each reference by its RMS, rescaled to the weighted mean RMS.
    """
    require_choice("combine mode", mode, COMBINE_MODES)
    if not refs:
        raise ValueError("no references: connect at least one VL_EMBEDS to 'references'")
    first = refs[0]
    _check_refs("reference", refs, first)
    _check_refs("negative", negatives, first)
    w = _weights(weights, len(refs))
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an integer >= 0 (0 = reference #1's count), got {num_tokens!r}")
    batches = {next(iter(r.hidden.values())).shape[0] for r in [*refs, *negatives]}
    if len(batches) != 1:
        raise ValueError(f"references have batch sizes {sorted(batches)}: combine encodes of one image each")
    meta = dict(source=" + ".join(r.source or "?" for r in refs), image_sizes=sum((r.image_sizes for r in refs), ()))
    if len(refs) == 1 and not negatives and (num_tokens in (0, first.num_tokens) or mode == "concat"):
        return first
    hidden = {}
    for layer in first.layers:
        neg = _mean_negative(negatives, layer)
        tokens = [r.hidden[layer].float() for r in refs]
        if mode == "concat":
            hidden[layer] = torch.cat([_push_away(t, neg, negative_weight) for t in tokens], dim=1)
        else:
            n = num_tokens or first.num_tokens
            hidden[layer] = _push_away(AVERAGES[mode](tokens, w, n), neg, negative_weight)
        hidden[layer] = hidden[layer].to(first.hidden[layer].dtype)
    if mode == "concat":
        layout = _concat_layout(refs, w)
        extra = {**first.extra, REFERENCES_KEY: {"spans": layout["spans"], "weights": layout["weights"]}}
        return first.with_hidden(hidden, image_spans=layout["image_spans"], prompt_span=(0, 0), extra=extra, **meta)
    n = num_tokens or first.num_tokens
    same_layout = all(r.num_tokens == n and r.image_spans == first.image_spans for r in refs)
    if same_layout:   # token i means the same role in every reference: keep the roles
        return first.with_hidden(hidden, **meta)
    image_spans = ((0, n),) if all(r.token_mode == "image" for r in refs) else ()
    return first.with_hidden(hidden, image_spans=image_spans, prompt_span=(0, 0), **meta)


def reference_layout(vl: VLEmbeds) -> list[tuple[tuple[int, int], float]]:
    """[((start, end), weight)] per concatenated reference, or one span of weight 1 for a plain VLEmbeds."""
    layout = vl.extra.get(REFERENCES_KEY)
    if not layout:
        return [((0, vl.num_tokens), 1.0)]
    return [((int(s), int(e)), float(w)) for (s, e), w in zip(layout["spans"], layout["weights"])]
