"""Token-length matching [B, N, D] → [B, n, D], and token concatenation under a budget."""
from __future__ import annotations

import math
from numbers import Integral

import torch
import torch.nn.functional as F

from .checks import require_choice, require_finite, require_tokens, require_width
from .stats import EPS

def _pool(x: torch.Tensor, n: int) -> torch.Tensor:
    """Window means; n ≤ N: out_i = mean x[⌊iN/n⌋ : ⌈(i+1)N/n⌉] (adaptive_avg_pool1d), n > N: out_i = x[⌊iN/n⌋]."""
    big_n = x.shape[1]
    if n > big_n:  # each token repeated ⌊n/N⌋ or ⌈n/N⌉ times (adaptive pooling would average neighbours here)
        idx = torch.arange(n, device=x.device) * big_n // n
        return x[:, idx]
    return F.adaptive_avg_pool1d(x.float().transpose(1, 2), n).transpose(1, 2).to(x.dtype)


def _rms_normalize(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """x̂ = x / sqrt(mean_d x_d² + eps) per token."""
    return x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)


def _attention_pool(x: torch.Tensor, n: int, query: torch.Tensor | None) -> torch.Tensor:
    """softmax(q̂·x̂ᵀ/√D)·x with q = query or pool(x, n), q̂/x̂ RMS-normalised per token (float32)."""
    xf = x.float()
    if query is None:
        q = _pool(xf, n)
    else:
        require_tokens("query", query)
        require_width("query", query.shape[-1], "x", x.shape[-1])
        if query.shape[1] != n:
            raise ValueError(f"query has {query.shape[1]} tokens but n={n}: pass n=query.shape[1]")
        if query.shape[0] not in (1, x.shape[0]) and x.shape[0] != 1:
            raise ValueError(f"query batch {query.shape[0]} does not match x batch {x.shape[0]} (or 1)")
        require_finite("query", query)
        q = query.float().to(x.device)
    scores = _rms_normalize(q) @ _rms_normalize(xf).transpose(1, 2) / math.sqrt(x.shape[-1])
    return (torch.softmax(scores, dim=-1) @ xf).to(x.dtype)


def _truncate(x: torch.Tensor, n: int) -> torch.Tensor:
    """First n tokens; if N < n, pad by repeating the last token: out_i = x[min(i, N−1)]."""
    if x.shape[1] >= n:
        return x[:, :n]
    pad = x[:, -1:].expand(-1, n - x.shape[1], -1)
    return torch.cat([x, pad], dim=1)


MATCHERS = {  # method → (x, n, query) → x resampled to n tokens
    "pool": lambda x, n, query: _pool(x, n),
    "attention_pool": _attention_pool,
    "truncate": lambda x, n, query: _truncate(x, n),
}
LENGTH_METHODS = tuple(MATCHERS)


def match_length(x: torch.Tensor, n: int, method: str, query: torch.Tensor | None = None) -> torch.Tensor:
    """Resample x [B, N, D] to n tokens, in x's dtype.

    pool:           adaptive average pooling, out_i = mean x[⌊iN/n⌋ : ⌈(i+1)N/n⌉] (every token counts);
                    n > N repeats tokens, out_i = x[⌊iN/n⌋]
    attention_pool: out = softmax(q̂·x̂ᵀ/√D)·x, q = query [B|1, n, D] (e.g. the text tokens) or pool(x, n),
                    ^ = per-token RMS normalisation (logits are √D·cos(q, x)); the other methods ignore query
    truncate:       out_i = x[min(i, N−1)] (first n tokens, last token repeated as padding)
    """
    require_choice("length method", method, LENGTH_METHODS)
    require_tokens("x", x)
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ValueError(f"n (target token count) must be an integer >= 1, got {n!r}")
    if x.shape[1] < 1:
        raise ValueError("x has no tokens: nothing to resample (check the token mode / spans of the encoding)")
    require_finite("x", x)
    return MATCHERS[method](x, int(n), query)


def concat_tokens(text: torch.Tensor, vl: torch.Tensor, budget: int) -> torch.Tensor:
    """cat([text, vl'], dim=1) with vl' = match_length(vl, budget, "pool") if 0 < budget < N_vl else vl (0 = all).

    vl is cast to text's dtype/device; a batch-1 vl is broadcast over text's batch.
    """
    require_tokens("text conditioning", text)
    require_tokens("VL", vl)
    require_width("VL", vl.shape[-1], "text conditioning", text.shape[-1])
    if isinstance(budget, bool) or not isinstance(budget, Integral) or budget < 0:
        raise ValueError(f"budget (VL token count to keep) must be an integer >= 0 (0 = keep all), got {budget!r}")
    if vl.shape[0] not in (1, text.shape[0]):
        raise ValueError(f"VL batch {vl.shape[0]} does not match text conditioning batch {text.shape[0]} (or 1)")
    if 0 < budget < vl.shape[1]:
        vl = match_length(vl, int(budget), "pool")
    vl = vl.to(device=text.device, dtype=text.dtype).expand(text.shape[0], -1, -1)
    return torch.cat([text, vl], dim=1)
