"""Shared ComfyUI glue: the pack's custom socket types and conditioning plumbing."""
from __future__ import annotations

from collections.abc import Callable

import torch
from comfy_api.latest import io

from ..vl_core.checks import require_finite, require_width
from ..vl_core.types import VLEmbeds

CATEGORY = "conditioning/zimage_vl"

VLEmbedsType = io.Custom("VL_EMBEDS")
VLModelType = io.Custom("QWEN3VL_MODEL")
VLDirectionType = io.Custom("VL_DIRECTION")


def check_vl_embeds(name: str, vl: VLEmbeds) -> VLEmbeds:
    if not isinstance(vl, VLEmbeds):
        raise ValueError(f"{name} must come from a VL Encode / Load VL Embeddings node, got {type(vl).__name__}")
    for layer, t in vl.hidden.items():
        require_finite(f"{name} (layer {vl.layer_label(layer)})", t)
    return vl


def check_conditioning(conditioning) -> None:
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError("conditioning is empty: connect a CLIPTextEncode (Z-Image text encoder) output")
    for i, entry in enumerate(conditioning):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and torch.is_tensor(entry[0])
                and entry[0].ndim == 3):
            raise ValueError(f"conditioning entry {i} is not a [tensor [B, N, D], options] pair")
        require_finite(f"conditioning entry {i}", entry[0])


def map_conditioning(conditioning, fn: Callable[[torch.Tensor], torch.Tensor], vl_width: int) -> list:
    """Apply fn to each conditioning tensor [B, N, D]; copies options, keeps attention_mask consistent.

    Z-Image reads `attention_mask` (and derives num_tokens from it), so a changed token count
    gets an all-ones mask of the new length.
    """
    check_conditioning(conditioning)
    out = []
    for cond, options in conditioning:
        require_width("VL embeddings", vl_width, "text conditioning", cond.shape[-1])
        new = fn(cond)
        require_finite("blend result", new)
        options = options.copy()
        mask = options.get("attention_mask")
        if mask is not None and mask.shape[-1] != new.shape[1]:
            options["attention_mask"] = torch.ones((mask.shape[0], new.shape[1]), dtype=mask.dtype,
                                                   device=mask.device)
        out.append([new.to(cond.dtype), options])
    return out


def vl_tokens_like(vl: VLEmbeds, ref: torch.Tensor) -> torch.Tensor:
    """The VL tokens [B', N, D] on ref's device/dtype, broadcast to ref's batch."""
    tokens = vl.tokens().to(device=ref.device, dtype=torch.float32)
    if tokens.shape[0] != ref.shape[0]:
        tokens = tokens[:1].expand(ref.shape[0], -1, -1)
    return tokens


def validation_answer(check: Callable, *args) -> bool | str:
    """What a node's validate_inputs returns for a check: True, or the check's ValueError message (shown by ComfyUI
    under the input before anything runs)."""
    try:
        check(*args)
    except ValueError as e:
        return str(e)
    return True


def backend_inputs() -> list:
    """The two optional VL backend inputs every encode consumer declares (exactly one must be connected)."""
    return [
        io.Clip.Input("clip", optional=True,
                      tooltip="Native backend: Qwen3-VL-4B loaded with ComfyUI's CLIPLoader. "
                              "Connect this OR vl_model."),
        VLModelType.Input("vl_model", optional=True,
                          tooltip="Transformers backend: output of 'Load Qwen3-VL (transformers)'. "
                                  "Connect this OR clip."),
    ]
