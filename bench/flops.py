"""FLOP accounting of the fast Qwen3-VL encode (bench only: the roofline the bench compares against)."""
from __future__ import annotations

from collections.abc import Sequence


def encode_flops(spec, grids: Sequence[tuple[int, int]], num_tokens: int, deepest: int,
                 batch: int = 1, vision_ffn: int | None = None, text_ffn: int | None = None,
                 vision_out: int | None = None) -> dict[str, float]:
    """Matmul + attention FLOPs of one runner forward (2 per multiply-add; causal attention counted half).

    spec: the runner's Qwen3VLSpec (vl_core/encoders/qwen3vl_spec.py).
    grids: (gh, gw) patch grid of each image of one sequence; the LM runs `deepest` layers (all when
    deepest == num_layers). Returns {"vision", "text", "total"} for `batch` sequences.
    """
    hv = spec.vision_hidden
    ffv = vision_ffn or 4 * hv
    out = vision_out or spec.hidden
    cin = 3 * spec.temporal_patch_size * spec.patch_size ** 2
    vision = 0.0
    for gh, gw in grids:
        p = gh * gw
        vision += 2 * p * cin * hv
        vision += spec.vision_depth * (2 * p * hv * 3 * hv + 4 * p * p * hv + 2 * p * hv * hv + 4 * p * hv * ffv)
        q = p // spec.merge_size ** 2
        md = hv * spec.merge_size ** 2
        vision += (1 + len(spec.deepstack_indexes)) * (2 * q * md * md + 2 * q * md * out)
    n, d, hd = num_tokens, spec.hidden, spec.head_dim
    ff = text_ffn or 4 * d
    per_layer = (2 * n * d * spec.heads * hd + 4 * n * d * spec.kv_heads * hd + 2 * n * spec.heads * hd * d
                 + 2 * n * n * spec.heads * hd + 6 * n * d * ff)
    text = per_layer * min(deepest, spec.num_layers)
    return {"vision": vision * batch, "text": text * batch, "total": (vision + text) * batch}
