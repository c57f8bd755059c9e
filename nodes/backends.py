"""Which Qwen3-VL backend an encode runs on: one place for every node that encodes reference images.

- native:       a Qwen3-VL CLIP from ComfyUI's CLIPLoader, adapted by native_clip.NativeQwen3VLEncoder;
- transformers: the QWEN3VL_MODEL value of 'Load Qwen3-VL (transformers)', a transformers_model.TransformersVLModel.

Both implement vl_core.encoders.VLEncoder plus `encode_many` and `offload`; neither imports the other.
"""
from __future__ import annotations

from .native_clip import NativeQwen3VLEncoder
from .transformers_model import TransformersVLModel


def vl_encoder(clip=None, vl_model=None) -> NativeQwen3VLEncoder | TransformersVLModel:
    """The encoder of exactly one connected backend (`clip` or `vl_model`); ValueError naming the fix otherwise."""
    if (clip is None) == (vl_model is None):
        raise ValueError("connect exactly one backend: a Qwen3-VL CLIP from CLIPLoader to 'clip', or "
                         "'Load Qwen3-VL (transformers)' to 'vl_model'")
    if clip is not None:
        return NativeQwen3VLEncoder.for_clip(clip)
    if not isinstance(vl_model, TransformersVLModel):
        raise ValueError(f"vl_model must come from 'Load Qwen3-VL (transformers)', got {type(vl_model).__name__}")
    return vl_model
