"""Argument checks shared by the conditioning ops; every failure is a ValueError that says what to do."""
from __future__ import annotations

from collections.abc import Sequence

import torch

WIDTH_HINT = "use Qwen3-VL-4B with Z-Image"


def require_finite(name: str, x: torch.Tensor) -> None:
    """Raise ValueError if `x` holds any NaN/Inf: ¬isfinite(x).any()."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf values (of {x.numel()}); the tensor is corrupt — "
                         "re-encode or check the upstream node")


def require_width(name_a: str, a_width: int, name_b: str, b_width: int, *, hint: str = WIDTH_HINT) -> None:
    """Raise ValueError unless two hidden widths agree: a_width = b_width."""
    if int(a_width) != int(b_width):
        raise ValueError(f"{name_a} width {a_width} does not match {name_b} width {b_width}: {hint}")


def require_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ValueError unless `value` ∈ `choices` (lists the valid ones)."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(repr(c) for c in choices)}")


def require_tokens(name: str, x: torch.Tensor) -> None:
    """Raise ValueError unless `x` is a floating tensor [B, N, D]."""
    if not torch.is_tensor(x) or x.ndim != 3:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be a tensor [batch, tokens, dims], got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def require_same_encoding(name: str, embeds, ref_name: str, ref, *, what: str) -> None:
    """Raise ValueError unless two VL encodings share width and layers (`what` = which inputs, for the fix)."""
    require_width(name, embeds.width, ref_name, ref.width, hint=f"encode {what} with the same Qwen3-VL model")
    if embeds.layers != ref.layers:
        raise ValueError(f"{name} holds layers {embeds.layers} but {ref_name} holds {ref.layers}: encode {what} "
                         "with the same layers")
