"""Reference-image checks, token-budget resizing and Qwen-VL patchification (shared by both backends)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RESIZE_POLICIES = ("fit_budget", "none")
MIN_SIDE = 32              # one merged token is 32×32 px (patch 16 × spatial merge 2)
MAX_INPUT_PIXELS = 8192 * 8192


def check_image(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Validate a ComfyUI IMAGE ([B, H, W, C] float in 0..1) holding one RGB picture; returns [H, W, 3]."""
    if not torch.is_tensor(image) or image.ndim != 4:
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"{name} must be a ComfyUI IMAGE [batch, height, width, channels], got {shape}")
    b, h, w, c = image.shape
    if b != 1:
        raise ValueError(f"{name} is a batch of {b} images; VL Encode takes one reference at a time: pick one "
                         "with 'ImageFromBatch' (or encode each and blend the results)")
    if c == 4:
        raise ValueError(f"{name} has an alpha channel (RGBA); give the RGB image (LoadImage's IMAGE output is "
                         "RGB, or drop alpha with an 'Image RGB'/'Split Image with Alpha' node)")
    if c != 3:
        raise ValueError(f"{name} has {c} channel(s); Qwen3-VL needs RGB (3 channels): convert grayscale "
                         "images to RGB first")
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"{name} is {w}×{h} px; the vision tower needs at least {MIN_SIDE}×{MIN_SIDE} px "
                         "(one token per 32×32 px): upscale it first")
    if h * w > MAX_INPUT_PIXELS:
        raise ValueError(f"{name} is {w}×{h} px, more than the {MAX_INPUT_PIXELS // 10**6} MP this node accepts: "
                         "downscale it first")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name} contains NaN/Inf pixels: check the node that produced it")
    return image[0]


def plan_size(height: int, width: int, max_tokens: int, policy: str, factor: int = 32) -> tuple[int, int]:
    """Size (h, w), multiples of `factor`, that the vision tower will see; tokens = h·w / factor².

    fit_budget: keep aspect, scale by s = min(1, sqrt(max_tokens·factor² / (h·w))), snap down to factor.
    none:       snap to the nearest multiple of factor; refuse if that exceeds max_tokens.
    """
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if max_tokens < 1:
        raise ValueError(f"max_image_tokens must be ≥ 1, got {max_tokens}")
    if policy == "none":
        h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
        if (h // factor) * (w // factor) > max_tokens:
            raise ValueError(
                f"image {width}×{height} px gives {(h // factor) * (w // factor)} tokens, over max_image_tokens="
                f"{max_tokens}: raise max_image_tokens or use resize policy 'fit_budget'")
        return h, w
    scale = min(1.0, math.sqrt(max_tokens * factor * factor / (height * width)))
    h = max(factor, math.floor(height * scale / factor) * factor)
    w = max(factor, math.floor(width * scale / factor) * factor)
    while (h // factor) * (w // factor) > max_tokens:  # flooring one side to `factor` can overshoot
        if h >= w:
            h -= factor
        else:
            w -= factor
    return h, w


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[H, W, 3] → [h, w, 3] bilinear (antialiased when shrinking); identity when the size already matches."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    x = image.permute(2, 0, 1).unsqueeze(0).float()
    shrink = size[0] < image.shape[0] or size[1] < image.shape[1]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return x.clamp(0, 1)[0].permute(1, 2, 0).to(image.dtype)


def to_patches(image: torch.Tensor, patch_size: int = 16, temporal_patch_size: int = 2, merge_size: int = 2,
               mean: float = 0.5, std: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, W, 3] in 0..1 → (pixel_values [gh·gw, 3·T·P·P], grid_thw [1, 3]) in the Qwen-VL patch order.

    x̂ = (x − mean)/std, the frame repeated T times, patches ordered by merge window (HF/ComfyUI layout).
    """
    h, w, c = image.shape
    gh, gw = h // patch_size, w // patch_size
    if gh % merge_size or gw % merge_size:
        raise ValueError(f"image size {w}×{h} must be a multiple of {patch_size * merge_size} px")
    x = ((image.permute(2, 0, 1).float() - mean) / std).unsqueeze(0).repeat(temporal_patch_size, 1, 1, 1)
    x = x.reshape(1, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                  gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return x, torch.tensor([[1, gh, gw]], dtype=torch.long)
