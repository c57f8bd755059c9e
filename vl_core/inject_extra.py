"""Shapes of the attention the DiT Layer Injection adds (pure torch): regions, reference weights, K/V scaling,
one softmax shared with the block's own keys, AdaIN of queries/keys, steering of a token stream.

Notation as in inject.py: q [B, H, Lq, d] image queries, k/v [1|B, H, N, d] keys/values of a source (VL tokens,
a reference latent's image tokens), w the block's weight (strength × block weight × step factor).

    add      out_img += w · m ⊙ Σ_s sign_s · softmax(q·k_sᵀ/√d + b_s)·v_s            (separate softmax per source)
    joint    out_img ← lerp(out_img, softmax([q·k_ownᵀ; q·k_refᵀ + log w]/√d)·[v_own; v_ref], m)  (one softmax)
    m        per image-token weights in [0, 1] from a MASK (1 everywhere without one)
    b_s      log(w_i / max w) on the keys of reference i (several references, one softmax, weights as masses)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .inject import Rows, gather_rows, inplace_ok
from .pooling import match_length

KV_SCALES = ("v", "k_and_v")
SHARES = ("add", "joint")
SpanWeights = list[tuple[tuple[int, int], float]]


@dataclass(frozen=True)
class Source:
    """Keys/values one softmax runs over. bias: [N] additive logits (None = 0); sign: +1 or −w_neg (subtract)."""

    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None = None
    sign: float = 1.0


def mask_token_weights(mask: torch.Tensor, grid_h: int, grid_w: int, padded: int) -> torch.Tensor:
    """[Bm, H, W] (or [H, W]) in [0, 1] → [Bm, padded] per image-token weights: area average over each patch
    (adaptive_avg_pool2d to the token grid), row-major like Z-Image's patch order, 0 on the pad tokens."""
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"mask must be [B, H, W] or [H, W], got {tuple(mask.shape)}")
    pooled = F.adaptive_avg_pool2d(m[:, None], (grid_h, grid_w))[:, 0].clamp(0.0, 1.0).flatten(1)
    return F.pad(pooled, (0, padded - pooled.shape[1]))


def rows_token_weights(weights: torch.Tensor, rows: Rows, batch: int, chunks: int) -> torch.Tensor:
    """[Σrows, L] token weights of the selected rows: row r of a CFG batch of `chunks` chunks is latent r mod
    (batch / chunks); a batch-1 weight broadcasts (ValueError when the mask batch matches neither)."""
    per_chunk = batch // max(chunks, 1)
    if weights.shape[0] not in (1, per_chunk):
        raise ValueError(f"mask has a batch of {weights.shape[0]}, the latent a batch of {per_chunk}: give one mask "
                         "for all latents or one per latent")
    if weights.shape[0] == 1:
        return weights.expand(sum(e - s for s, e in rows), -1)
    index = torch.cat([torch.arange(s, e, device=weights.device) for s, e in rows]) % per_chunk  # no host copy
    return weights[index]


def span_key_bias(spans: SpanWeights, n: int) -> torch.Tensor | None:
    """[n] logits bias log(w_i / max_j w_j) on the keys of span i (−inf for w_i = 0): in one softmax over all
    references, reference i gets attention mass ∝ w_i. None when all weights are equal (no bias)."""
    weights = [w for _, w in spans]
    if len(set(weights)) <= 1:
        return None
    top = max(weights)
    bias = torch.zeros(n)
    for (s, e), w in spans:
        bias[s:e] = math.log(w / top) if w > 0 else -math.inf
    return bias


def pool_spans(tokens: torch.Tensor, spans: SpanWeights, budget: int) -> tuple[torch.Tensor, SpanWeights]:
    """tokens [1, N, D] with each span area-pooled on its own to ≈ budget·len/N tokens (≥ 1), so pooling never
    mixes two references; budget 0 or ≥ N: as is. Returns the tokens and the new spans."""
    n = tokens.shape[1]
    if not 0 < budget < n:
        return tokens, spans
    parts, out, start = [], [], 0
    for (s, e), w in spans:
        size = max(1, round(budget * (e - s) / n))
        parts.append(match_length(tokens[:, s:e], size, "pool"))
        out.append(((start, start + size), w))
        start += size
    return torch.cat(parts, dim=1), out


def scaled_source(src: Source, weight: float, kv_scale: str) -> tuple[Source, float]:
    """(source, output factor) for `out += factor·attn(source)`: v → (src, w), w·softmax(q·kᵀ)·v;
    k_and_v → (w·k, w): softmax(q·(w·k)ᵀ)·(w·v), the weight also sharpens (|w| > 1) or flattens the softmax."""
    if kv_scale == "v":
        return src, weight
    if kv_scale != "k_and_v":
        raise ValueError(f"kv_scale must be one of {KV_SCALES}, got {kv_scale!r}")
    return Source(src.k * weight, src.v, src.bias, src.sign), weight


def adain_tokens(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(x − μ_x)/σ_x · σ_ref + μ_ref per batch row, head and channel over tokens (dim −2); x [B, H, L, d],
    ref [1|B, H, N, d] (StyleAligned's AdaIN of queries and keys toward the reference's statistics)."""
    xf, rf = x.float(), ref.float()
    mu, sd = xf.mean(-2, keepdim=True), xf.std(-2, keepdim=True, correction=0) + eps
    mu_r, sd_r = rf.mean(-2, keepdim=True), rf.std(-2, keepdim=True, correction=0) + eps
    return ((xf - mu) / sd * sd_r + mu_r).to(x.dtype)


def attend(attention: Callable, q: torch.Tensor, src: Source) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias)·v → [B, Lq, H·d] through `attention(q, k, v, mask)` (bias as a broadcast mask, on
    q's device already: a per-block host→device copy would stall the pipeline)."""
    k, v = src.k, src.v
    if k.shape[0] != q.shape[0]:
        k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
    mask = None
    if src.bias is not None:
        mask = src.bias.to(dtype=q.dtype).view(1, 1, 1, -1).expand(q.shape[0], 1, q.shape[2], -1)
    return attention(q, k, v, mask)


Term = tuple[torch.Tensor, float]  # (attention output [Σrows, Lq, H·d], coefficient) of out += coefficient · output


def attention_terms(attention: Callable, q: torch.Tensor, sources: Sequence[Source], weight: float,
                    kv_scale: str) -> list[Term]:
    """[(attn(q, source_s), sign_s · factor)] per source (scaled_source): out += Σ_s sign_s·factor·attn_s."""
    terms = []
    for src in sources:
        scaled, factor = scaled_source(src, weight, kv_scale)
        terms.append((attend(attention, q, scaled), factor * src.sign))
    return terms


def joint_attention(attention: Callable, q: torch.Tensor, k_own: torch.Tensor, v_own: torch.Tensor,
                    ref: Source, weight: float) -> torch.Tensor:
    """softmax over [own keys; reference keys + log w]: [B, Lq, H·d]; w > 0 (its log is the reference's bias)."""
    if not weight > 0:
        raise ValueError(f"share=joint needs a positive weight (its log is the reference bias), got {weight}")
    b = q.shape[0]
    k_ref, v_ref = ref.k.expand(b, -1, -1, -1), ref.v.expand(b, -1, -1, -1)
    n_own = k_own.shape[2]
    bias = None
    if weight != 1.0 or ref.bias is not None:  # decided on the host: no device read
        bias = torch.zeros(n_own + k_ref.shape[2], device=q.device, dtype=torch.float32)
        bias[n_own:] = math.log(weight)
        if ref.bias is not None:
            bias[n_own:] += ref.bias.to(bias.device)
    return attend(attention, q, Source(torch.cat([k_own, k_ref], dim=2), torch.cat([v_own, v_ref], dim=2), bias))


def accumulate_(out: torch.Tensor, terms: Sequence[Term], rows: Rows, start: int,
                token_weights: torch.Tensor | None = None, replace: torch.Tensor | None = None) -> torch.Tensor:
    """On out[rows, start:] (each term stacked in row-run order, m [Σrows, L − start] or None = 1):
    x ← x + m ⊙ (replace − x) when `replace` is given (torch.lerp), then x ← x + Σ c·m ⊙ attn (add_ / addcmul_:
    no temporary per term). In place when allowed, else on a copy; m = 0 leaves a token bit for bit."""
    if not inplace_ok(out):
        out = out.clone()
    offset = 0
    for s, e in rows:
        n = e - s
        part = out[s:e, start:]
        m = None if token_weights is None else token_weights[offset:offset + n, :, None].to(out.dtype)
        if replace is not None:
            end = replace[offset:offset + n].to(out.dtype)
            if m is None:
                part.copy_(end)
            else:
                part.lerp_(end, m)
        for attn, coef in terms:
            piece = attn[offset:offset + n].to(out.dtype)
            if m is None:
                part.add_(piece, alpha=coef)
            else:
                part.addcmul_(piece, m, value=coef)
        offset += n
    return out


def steer_tokens(x: torch.Tensor, direction: torch.Tensor, weight: float,
                 token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """x + w · m ⊙ rms(x_t) · d̂_t per token, d̂ = direction / rms(direction) ([1|L, D] rows, broadcast over the
    batch): a step as loud as the token times w, whatever the stream's scale. Out of place."""
    xf = x.float()
    rms = xf.square().mean(-1, keepdim=True).add(1e-12).sqrt()
    d = direction.float().to(x.device)
    d = d / d.square().mean(-1, keepdim=True).add(1e-12).sqrt()
    step = weight * rms * d
    if token_weights is not None:
        step = step * token_weights[..., None].to(step.device)
    return (xf + step).to(x.dtype)


def query_rows(q: torch.Tensor, rows: Rows, start: int) -> torch.Tensor:
    """The image queries of the selected rows, [Σrows, H, L − start, d]."""
    return gather_rows(q, rows)[:, :, start:]


__all__ = ["KV_SCALES", "SHARES", "Source", "SpanWeights", "Term", "accumulate_", "adain_tokens", "attend",
           "attention_terms", "joint_attention", "mask_token_weights", "pool_spans", "query_rows",
           "rows_token_weights", "scaled_source", "span_key_bias", "steer_tokens"]
