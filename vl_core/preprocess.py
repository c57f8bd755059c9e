"""Reference-image checks, token-budget resizing and Qwen-VL patchification (shared by both backends)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import require_choice

RESIZE_POLICIES = ("fit_budget", "none")
MIN_SIDE = 32              # one merged token is 32×32 px (patch 16 × spatial merge 2)
MAX_INPUT_PIXELS = 8192 * 8192
# ComfyUI's Qwen-VL preprocessing (comfy/text_encoders/qwen_vl.py, process_qwen2vl_images) keeps this pixel range
QWEN_VL_MIN_PIXELS, QWEN_VL_MAX_PIXELS = 3136, 12845056


def image_tokens(height: int, width: int, patch_size: int = 16, merge_size: int = 2) -> int:
    """Merged vision tokens of an image the tower sees at height×width px: (h // p)·(w // p) / m²."""
    return (int(height) // patch_size) * (int(width) // patch_size) // merge_size ** 2


def qwen_vl_resize(height: int, width: int, factor: int = 32, min_pixels: int = QWEN_VL_MIN_PIXELS,
                   max_pixels: int = QWEN_VL_MAX_PIXELS) -> tuple[int, int]:
    """(h, w) the Qwen-VL "smart resize" gives (ComfyUI's rule): each side rounded to a multiple of `factor`
    (= patch · merge), then scaled by β = sqrt(h·w / max_pixels) down, or sqrt(min_pixels / (h·w)) up, to fit."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


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
        raise ValueError(f"{name} has an alpha channel (RGBA); give the RGB image: LoadImage's IMAGE output is "
                         "RGB, or drop the alpha with the core 'Split Image with Alpha' node (SplitImageWithAlpha) "
                         "and connect its IMAGE output")
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
    require_choice("resize policy", policy, RESIZE_POLICIES)
    if max_tokens < 1:
        raise ValueError(f"max_image_tokens must be ≥ 1, got {max_tokens}")
    def tokens(h: int, w: int) -> int:
        return image_tokens(h, w, factor, 1)

    if policy == "none":
        h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
        if tokens(h, w) > max_tokens:
            raise ValueError(
                f"image {width}×{height} px gives {tokens(h, w)} tokens, over max_image_tokens="
                f"{max_tokens}: raise max_image_tokens or use resize policy 'fit_budget'")
        return h, w
    scale = min(1.0, math.sqrt(max_tokens * factor * factor / (height * width)))
    h = max(factor, math.floor(height * scale / factor) * factor)
    w = max(factor, math.floor(width * scale / factor) * factor)
    while tokens(h, w) > max_tokens:  # flooring one side to `factor` can overshoot
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


def fit_image(image: torch.Tensor, max_tokens: int, policy: str, name: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE [1, H, W, 3] → the [h, w, 3] picture the vision tower sees: check_image, plan_size, resize_image."""
    picture = check_image(image, name)
    return resize_image(picture, plan_size(picture.shape[0], picture.shape[1], max_tokens, policy))


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
