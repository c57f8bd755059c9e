"""TEST-ONLY CLIP nodes built from ComfyUI's own classes, for the semantic metric node.

  TinyCLIPVision -> CLIP_VISION (comfy.clip_vision.ClipVisionModel: CLIP ViT or SigLIP layout, width 64,
                    2 layers, 56 px input, CLIP projection to TINY_CLIP_WIDTH)
  TinyCLIPText   -> CLIP        (comfy.sd1_clip SD1 tokenizer + CLIP-L text model shrunk to width TINY_CLIP_WIDTH,
                    so its projected pooled output shares the tiny vision model's embedding width)

Weights come from a seeded generator (deterministic_fill_), so two builds with one seed are identical.
Registers itself in the tiny nodes package's mappings when the package imports it.
"""
from __future__ import annotations

import sys

import torch

import comfy.clip_vision
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base

TINY_CLIP_WIDTH = 64
VISION_KINDS = ("clip_vision_model", "siglip_vision_model")


def tiny_clip_vision_config(model_type: str) -> dict:
    config = {"hidden_act": "quick_gelu" if model_type == "clip_vision_model" else "gelu_pytorch_tanh",
              "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
              "image_size": 56, "patch_size": 14, "num_channels": 3, "layer_norm_eps": 1e-5, "model_type": model_type}
    if model_type == "clip_vision_model":
        config["projection_dim"] = TINY_CLIP_WIDTH
    else:
        config.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return config


def build_tiny_clip_vision(seed: int = 0, model_type: str = "clip_vision_model"):
    from . import deterministic_fill_

    clip_vision = comfy.clip_vision.ClipVisionModel(tiny_clip_vision_config(model_type))
    deterministic_fill_(clip_vision.model, seed)
    return clip_vision


def build_tiny_clip_text(seed: int = 0):
    from . import deterministic_fill_

    text_config = {"hidden_size": TINY_CLIP_WIDTH, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 2}
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    model_options = {"clip_l_model_config": text_config,
                     "load_device": torch.device("cpu"), "offload_device": torch.device("cpu")}
    clip = comfy.sd.CLIP(target=target, model_options=model_options, disable_dynamic=True)
    deterministic_fill_(clip.cond_stage_model, seed)
    return clip


_SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the deterministic weight fill."})


class TinyCLIPVision:
    CATEGORY = "testing/zimage_vl_tiny"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "build"
    DESCRIPTION = "TEST ONLY: ComfyUI's CLIP / SigLIP vision model shrunk to width 64, 2 layers, 56 px."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED, "model_type": (list(VISION_KINDS), {"tooltip": "Layout to build."})}}

    def build(self, seed, model_type):
        return (build_tiny_clip_vision(seed, model_type),)


class TinyCLIPText:
    CATEGORY = "testing/zimage_vl_tiny"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    DESCRIPTION = f"TEST ONLY: ComfyUI's SD1 CLIP-L text model shrunk to width {TINY_CLIP_WIDTH}, 2 layers."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED}}

    def build(self, seed):
        return (build_tiny_clip_text(seed),)


_package = sys.modules.get(__package__) if __package__ else None
if _package is not None and hasattr(_package, "NODE_CLASS_MAPPINGS"):
    _package.NODE_CLASS_MAPPINGS.update(TinyCLIPVision=TinyCLIPVision, TinyCLIPText=TinyCLIPText)
    _package.NODE_DISPLAY_NAME_MAPPINGS.update(TinyCLIPVision="Tiny CLIP vision (TEST)",
                                               TinyCLIPText="Tiny CLIP-L text (TEST)")
