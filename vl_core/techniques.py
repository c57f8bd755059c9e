"""The embedding-level techniques, one recipe each: text conditioning [B, N, D] + VL tokens → new conditioning.

Each recipe is everything its node does to one conditioning tensor (the node only validates ComfyUI types and
maps the recipe over the conditioning list). Inputs are text in its own dtype and VL tokens [B|1, M, D]; the
result is in text's dtype. Variants are table entries: adding one is a function (or a row) and a key.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from . import blend, pooling
from .checks import require_choice
from .normalize import normalize_to_reference
from .stats import dim_stats


@dataclass(frozen=True)
class BlendMode:
    """An Embedding Blend mode: how the per-token weights ramp (blend.RAMPS) and how tokens mix (blend.MIXES)."""

    ramp: str
    mix: str


BLEND_MODES = {  # Embedding Blend's `mode` option → its ramp and mix
    "linear": BlendMode(ramp="constant", mix="linear"),
    "slerp": BlendMode(ramp="constant", mix="slerp"),
    "graduated": BlendMode(ramp="graduated", mix="linear"),
}


def _mixed(length: str, text: torch.Tensor, vl: torch.Tensor, alpha: float, mode: BlendMode,
           token_budget: int) -> torch.Tensor:
    """blend(t, match_length(v, N, length, query=t), ramp(N, α), mix): same token count as the text."""
    n = text.shape[1]
    vl = pooling.match_length(vl, n, length, query=text)
    return blend.blend(text, vl, blend.token_ramp(n, alpha, mode.ramp), mode.mix)


def _appended(text: torch.Tensor, vl: torch.Tensor, alpha: float, mode: BlendMode,
              token_budget: int) -> torch.Tensor:
    """cat([t, pool(v, k)]) with k = round(α·(token_budget or M)); k = 0 gives t itself."""
    count = round(alpha * (token_budget or vl.shape[1]))
    return text if count == 0 else pooling.concat_tokens(text, vl, count)


BLEND_LENGTHS = {  # Embedding Blend's `length` option → how the VL tokens meet the text tokens
    **{method: partial(_mixed, method) for method in pooling.LENGTH_METHODS},
    "concat": _appended,  # keep the text, append VL tokens: no mixing (mode unused)
}


def embedding_blend(text: torch.Tensor, vl: torch.Tensor, alpha: float, mode: str, length: str, normalize: str,
                    token_budget: int) -> torch.Tensor:
    """VL Embedding Blend: v ← normalize_to_reference(v, stats(t), normalize), then BLEND_LENGTHS[length].

    mixing lengths: (1 − w_i)·t_i + w_i·v'_i (or slerp) with v' = v matched to N tokens, w = ramp(N, α);
    concat: [t, pool(v, round(α·(token_budget or M)))] (α·… rounding to 0 gives t bit for bit).
    """
    require_choice("mode", mode, tuple(BLEND_MODES))
    require_choice("length", length, tuple(BLEND_LENGTHS))
    t = text.float()
    tokens = normalize_to_reference(vl, dim_stats(t), normalize)
    return BLEND_LENGTHS[length](t, tokens, alpha, BLEND_MODES[mode], token_budget).to(text.dtype)


def embedding_style_delta(text: torch.Tensor, vl_style: torch.Tensor, vl_neutral: torch.Tensor, strength: float,
                          normalize: bool, length: str) -> torch.Tensor:
    """VL Style Delta: t + s·(match(v_style) − match(v_neutral)), both matched to N tokens (query = t);
    normalize rescales the delta to the text's mean per-token RMS (blend.style_delta)."""
    t = text.float()
    n = t.shape[1]
    styled = pooling.match_length(vl_style, n, length, query=t)
    plain = pooling.match_length(vl_neutral, n, length, query=t)
    return blend.style_delta(t, styled, plain, strength, normalize).to(text.dtype)


ADAIN_STYLE_TOKENS = {  # AdaIN mode → the style tokens it compares with the text: per token needs N of them
    "per_token": lambda vl, text, length: pooling.match_length(vl, text.shape[1], length, query=text),
    "per_dim": lambda vl, text, length: vl,  # statistics over tokens: any count (length unused)
}


def embedding_adain(text: torch.Tensor, vl: torch.Tensor, mode: str, weight: float, length: str) -> torch.Tensor:
    """VL AdaIN: lerp(t, AdaIN(t → style), weight) with style = ADAIN_STYLE_TOKENS[mode] (blend.adain's math)."""
    require_choice("adain mode", mode, tuple(ADAIN_STYLE_TOKENS))
    t = text.float()
    return blend.adain(t, ADAIN_STYLE_TOKENS[mode](vl, t, length), mode, weight).to(text.dtype)
