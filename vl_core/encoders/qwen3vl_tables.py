"""Index and RoPE tables of one Qwen3-VL encode, built on the CPU before the forward (no device syncs inside it).

MRoPE positions of the language model, its rotary (cos, sin) tables, and the vision tower's per-grid
tables (bilinear position-embedding taps and 2-D rotary tables, patches in merge-window order).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .qwen3vl_spec import Qwen3VLSpec


def mrope_positions(input_ids: Sequence[int], image_pad_id: int, merged_grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[3, N] T/H/W MRoPE positions (Qwen2/3-VL rule, = HF get_rope_index = ComfyUI qwen2vl_mrope_position_ids).

    Text runs sequentially; the k-th run of image pads gets (t, h, w) = (p, p + row, p + col) over its
    merged grid (mh, mw), p = the position the run starts at; text after it resumes at p + max(mh, mw).
    """
    ids = list(input_ids)
    out = torch.empty(3, len(ids), dtype=torch.long)
    pos, i, k = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_pad_id:
            out[:, i] = pos
            pos += 1
            i += 1
            continue
        if k >= len(merged_grids):
            raise ValueError("more image-pad runs than images")
        mh, mw = merged_grids[k]
        n = mh * mw
        if ids[i:i + n] != [image_pad_id] * n:
            raise ValueError(f"image {k}: expected {n} consecutive image pads")
        out[0, i:i + n] = pos
        out[1, i:i + n] = (torch.arange(mh) + pos).repeat_interleave(mw)
        out[2, i:i + n] = (torch.arange(mw) + pos).repeat(mh)
        pos += max(mh, mw)
        i += n
        k += 1
    if k != len(merged_grids):
        raise ValueError(f"{len(merged_grids)} images but {k} image-pad runs")
    return out


def text_rope(positions: torch.Tensor, spec: Qwen3VLSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [N, head_dim] float32 for MRoPE positions [3, N] (interleaved or sectioned)."""
    hd = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    freqs = positions.float()[:, :, None] * inv_freq[None, None, :]          # [3, N, hd/2]
    sec = spec.mrope_section
    if spec.mrope_interleaved:
        f = freqs[0].clone()
        for axis, offset in ((1, 1), (2, 2)):
            idx = slice(offset, sec[axis] * 3, 3)
            f[:, idx] = freqs[axis][:, idx]
        emb = torch.cat((f, f), dim=-1)
        return emb.cos(), emb.sin()
    emb = torch.cat((freqs, freqs), dim=-1)                                   # [3, N, hd]
    cos, sin = emb.cos(), emb.sin()
    split = list(sec) * 2
    cos = torch.cat([c[i % 3] for i, c in enumerate(cos.split(split, dim=-1))], dim=-1)
    sin = torch.cat([s[i % 3] for i, s in enumerate(sin.split(split, dim=-1))], dim=-1)
    return cos, sin


def vision_tables(gh: int, gw: int, spec: Qwen3VLSpec):
    """CPU tables for one (gh, gw) patch grid, patches in merge-window order:
    (pos-embed taps [P, 4] long, tap weights [P, 4] float32, rotary cos [P, hd], sin [P, hd] float32)."""
    m, side = spec.merge_size, spec.num_grid_per_side
    r = torch.arange(gh).view(gh // m, m, 1, 1).expand(gh // m, m, gw // m, m)
    c = torch.arange(gw).view(1, 1, gw // m, m).expand(gh // m, m, gw // m, m)
    row = r.permute(0, 2, 1, 3).reshape(-1)      # merge-window order: (block_row, block_col, in_row, in_col)
    col = c.permute(0, 2, 1, 3).reshape(-1)

    def taps(index, size):   # bilinear, align_corners=True over `side` table entries (= ComfyUI linspace)
        src = index.float() * (side - 1) / max(size - 1, 1)
        lo = src.floor()
        w1 = src - lo
        lo = lo.long().clamp(0, side - 1)
        hi = (lo + 1).clamp(max=side - 1)
        return lo, hi, 1.0 - w1, w1

    h0, h1, wh0, wh1 = taps(row, gh)
    w0, w1_, ww0, ww1 = taps(col, gw)
    idx = torch.stack([h0 * side + w0, h0 * side + w1_, h1 * side + w0, h1 * side + w1_], dim=1)
    wts = torch.stack([wh0 * ww0, wh0 * ww1, wh1 * ww0, wh1 * ww1], dim=1)

    rot_dim = spec.vision_head_dim // 2
    inv_freq = 1.0 / (spec.vision_rope_theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim))
    freqs = torch.cat([row.float()[:, None] * inv_freq, col.float()[:, None] * inv_freq], dim=-1)   # [P, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return idx, wts, emb.cos(), emb.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """[-sin[..., :half], sin[..., half:]]: rotate_half folded into the sine table."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
