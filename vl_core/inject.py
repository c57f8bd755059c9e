"""Pure-torch math of the DiT layer injection (no comfy import); the ComfyUI glue is nodes/injection*.py.

Notation: B batch, L tokens, D model width, H query heads, Hkv key/value heads, d head width (D = H·d).

caption stream   at a selected main block, on the caption slice txt [B, L, D] and the VL tokens
                 embedded like a caption vl [1|B, L, D], with weight w:
                     lerp: txt ← txt + w·(vl − txt)        add: txt ← txt + w·vl
decoupled attention (training-free IP-Adapter analogue): the VL keys/values of a block (vl_keys_values);
                 how they are attended and added is in inject_extra.py.
rows             a CFG batch is cond_or_uncond chunks of equal size; the hooks act on the row runs
                 of the selected chunks only (0 = conditional, 1 = unconditional).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .checks import require_choice
from .pooling import match_length

CAPTION_MODES = ("lerp", "add")
APPLY_TO = ("cond_only", "both")

Rows = list[tuple[int, int]]  # [start, end) row runs of a batch


def chunk_rows(cond_or_uncond: Sequence[int] | None, batch: int, apply_to: str) -> Rows:
    """Row runs [start, end) of a batch made of len(cond_or_uncond) equal chunks that the injection acts on.

    apply_to = "both": every row; "cond_only": rows of chunks whose flag is 0 (conditional).
    cond_or_uncond None/empty (a direct model call): the whole batch is treated as conditional.
    Adjacent runs are merged.
    """
    require_choice("apply_to", apply_to, APPLY_TO)
    if batch < 1:
        return []
    if not cond_or_uncond or apply_to == "both":
        return [(0, batch)]
    chunks = len(cond_or_uncond)
    if batch % chunks:
        raise ValueError(f"batch of {batch} rows cannot be split into {chunks} equal cond/uncond chunks")
    size = batch // chunks
    runs: Rows = []
    for i, flag in enumerate(cond_or_uncond):
        if flag != 0:
            continue
        s, e = i * size, (i + 1) * size
        if runs and runs[-1][1] == s:
            runs[-1] = (runs[-1][0], e)
        else:
            runs.append((s, e))
    return runs


def rows_within(rows: Rows, start: int, end: int) -> Rows:
    """The parts of the runs inside [start, end), shifted to start at 0 (the rows of a sub-batch)."""
    return [(max(s, start) - start, min(e, end) - start) for s, e in rows if s < end and e > start]


def rows_cover(rows: Rows, batch: int) -> bool:
    """True iff the runs are exactly the whole batch [0, batch)."""
    return rows == [(0, batch)]


def inplace_ok(x: torch.Tensor) -> bool:
    """Whether x may be modified in place: not tracked by autograd, and not an inference tensor outside
    inference mode (which torch forbids)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    if x.is_inference() and not torch.is_inference_mode_enabled():
        return False
    return True


def caption_update_(txt: torch.Tensor, vl: torch.Tensor, weight: float, mode: str, rows: Rows) -> None:
    """In place, on rows of txt [B, L, D]: lerp txt ← txt + w·(vl − txt) (torch.lerp), add txt ← txt + w·vl.

    vl [1|B, L, D] in txt's dtype/device (a batch-1 vl broadcasts). w = 0 leaves txt untouched (no op).
    """
    require_choice("caption mode", mode, CAPTION_MODES)
    if weight == 0.0:
        return
    if vl.shape[-2:] != txt.shape[-2:]:
        raise ValueError(f"VL caption tokens {tuple(vl.shape)} do not match the caption slice {tuple(txt.shape)}")
    for s, e in rows:
        part = txt[s:e]
        end = vl if vl.shape[0] == 1 else vl[s:e]
        if mode == "lerp":
            part.lerp_(end, weight)
        else:
            part.add_(end, alpha=weight)


def caption_update(txt: torch.Tensor, vl: torch.Tensor, weight: float, mode: str, rows: Rows) -> torch.Tensor:
    """Out-of-place caption_update_: a new tensor, txt untouched."""
    out = txt.clone()
    caption_update_(out, vl, weight, mode, rows)
    return out


def modulate(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN scale as Z-Image's main blocks apply it to their attention input: x·(1 + scale) per row.

    x [1|B, N, D], scale [B, D] → [B, N, D].
    """
    return x * (1 + scale.unsqueeze(1))


def split_kv(proj: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [B, N, Hkv, d] from a fused projection laid out [q | k | v] ((H + 2·Hkv)·d wide) or [k | v] (2·Hkv·d)."""
    b, n, width = proj.shape
    q_w, kv_w = n_heads * head_dim, n_kv_heads * head_dim
    if width == q_w + 2 * kv_w:
        proj = proj[..., q_w:]
    elif width != 2 * kv_w:
        raise ValueError(f"projection width {width} is neither (H + 2·Hkv)·d = ({n_heads} + 2·{n_kv_heads})·{head_dim} "
                         f"nor 2·Hkv·d")
    k = proj[..., :kv_w].reshape(b, n, n_kv_heads, head_dim)
    v = proj[..., kv_w:].reshape(b, n, n_kv_heads, head_dim)
    return k, v


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, N, Hkv, d] → [B, N, Hkv·n_rep, d], each kv head repeated n_rep times in a row (grouped-query layout)."""
    if n_rep == 1:
        return x
    return x.unsqueeze(3).expand(-1, -1, -1, n_rep, -1).flatten(2, 3)


def rms_norm_heads(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Per-head RMSNorm over the last dim: x / sqrt(mean(x²) + eps) · weight (Z-Image's q/k norms; the model uses
    eps = float32 machine epsilon when the norm has none)."""
    w = None if weight is None else weight.to(dtype=x.dtype, device=x.device)
    return F.rms_norm(x, (x.shape[-1],), weight=w, eps=eps)


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in ComfyUI/Flux layout: x [B, N, H, d], freqs_cis [B|1, N, 1, d/2, 2, 2] (float32).

    Each pair (x₀, x₁) becomes (f₀₀·x₀ + f₀₁·x₁, f₁₀·x₀ + f₁₁·x₁), computed in float32, returned in x's dtype.
    Position 0 is the identity rotation.
    """
    x_ = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * x_[..., 0] + freqs_cis[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def gather_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """x[rows] stacked in run order (a view when one run)."""
    if len(rows) == 1:
        s, e = rows[0]
        return x[s:e]
    return torch.cat([x[s:e] for s, e in rows], dim=0)


def padded_length(n: int, multiple: int | None) -> int:
    """Token count after padding to a multiple (Z-Image pads its caption to 32): n + (−n mod m)."""
    if not multiple:
        return n
    return n + (-n) % multiple


def pool_to_budget(tokens: torch.Tensor, budget: int) -> torch.Tensor:
    """tokens [B, N, D] area-pooled to `budget` tokens when 0 < budget < N (pooling.match_length "pool"); else as is.

    budget 0 = all tokens; a budget above N never up-samples.
    """
    if 0 < budget < tokens.shape[1]:
        return match_length(tokens, budget, "pool")
    return tokens


def image_token_count(height: int, width: int, patch: int, multiple: int | None) -> int:
    """Image tokens of a [.., H, W] latent in Z-Image's sequence: ⌈H/p⌉·⌈W/p⌉ padded to the pad multiple."""
    return padded_length((-(-height // patch)) * (-(-width // patch)), multiple)


def vl_keys_values(hidden: torch.Tensor, scale_msa: torch.Tensor, *, norm: Callable, project_kv: Callable,
                   k_norm: Callable, n_heads: int, n_kv_heads: int, head_dim: int,
                   freqs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [B, H, n, d] of the embedded VL tokens through one main block (the block's own functions passed in).

    h = norm(hidden)·(1 + scale_msa);  k, v = split(project_kv(h));  k ← k_norm(k), then RoPE(freqs) when given;
    both repeated to the H query heads (grouped-query layout).
    """
    h = modulate(norm(hidden), scale_msa)
    k, v = split_kv(project_kv(h), n_heads, n_kv_heads, head_dim)
    k = k_norm(k)
    if freqs is not None:
        k = apply_rope(k, freqs)
    n_rep = n_heads // n_kv_heads
    return repeat_kv(k, n_rep).movedim(1, 2), repeat_kv(v, n_rep).movedim(1, 2)


Segment = tuple[int, int, bool]  # [start, end) of a batch and whether the injection acts on it


def batch_segments(rows: Rows, batch: int) -> list[Segment]:
    """The batch [0, batch) cut at the selected row runs, in order: selected runs and the gaps between them."""
    segments, pos = [], 0
    for s, e in rows:
        if pos < s:
            segments.append((pos, s, False))
        segments.append((s, e, True))
        pos = e
    if pos < batch:
        segments.append((pos, batch, False))
    return segments


def cut_batch(value, start: int, end: int, batch: int):
    """value[start:end] for a tensor whose first dim is the batch; any other value unchanged."""
    return value[start:end] if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch else value


def cut_chunk_list(values, start: int, end: int, batch: int, chunks: int):
    """The entries of a per-chunk list (cond_or_uncond, uuids) that rows [start, end) cover; others unchanged."""
    if not isinstance(values, list) or chunks < 1 or len(values) != chunks:
        return values
    size = batch // chunks
    return values[start // size:end // size]


def run_by_segments(rows: Rows, batch: int, run: Callable[[int, int, bool], torch.Tensor]) -> torch.Tensor:
    """torch.cat([run(s, e, selected) for each of batch_segments(rows, batch)], dim 0): a batch whose selected
    rows need another model call than the others (e.g. a longer caption), as one call per segment."""
    return torch.cat([run(s, e, selected) for s, e, selected in batch_segments(rows, batch)], dim=0)


__all__ = [
    "APPLY_TO", "CAPTION_MODES", "apply_rope", "batch_segments", "caption_update", "caption_update_", "chunk_rows",
    "cut_batch", "cut_chunk_list", "gather_rows", "image_token_count", "inplace_ok", "modulate", "padded_length",
    "pool_to_budget", "repeat_kv", "rms_norm_heads", "rows_cover", "rows_within", "run_by_segments", "split_kv",
    "vl_keys_values",
]
