"""UI-format (editor) twin of tools.host_harness.swap_loaders_for_tiny: the shipped UI workflow with its real
loaders replaced by the tiny test nodes (same output slots, links kept), sized to run on a CPU in seconds."""
from __future__ import annotations

import copy

# UI loader type -> (tiny node type, widgets_values); the VL CLIPLoader is the one whose file name has "vl"
TINY = {
    "UNETLoader": ("TinyZImageModel", [0, 256]),
    "VAELoader": ("TinyVAE", [0]),
    "CLIPLoader": ("TinyZImageTextEncoder", [0, 256]),
    "CLIPLoader/vl": ("TinyQwen3VLClip", [0, 256]),
}


def swap_ui_loaders_for_tiny(workflow: dict, *, image: str, size: int = 64, steps: int = 2) -> dict:
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        kind = node["type"]
        if kind == "CLIPLoader" and "vl" in str(node["widgets_values"][0]).lower():
            kind = "CLIPLoader/vl"
        if kind in TINY:
            node["type"], node["widgets_values"] = TINY[kind]
            node["inputs"] = []  # loaders take no links; widget inputs are rebuilt from the tiny node's schema
            node["properties"] = {"Node name for S&R": node["type"]}
        elif node["type"] == "LoadImage":
            node["widgets_values"][0] = image
        elif node["type"] == "EmptySD3LatentImage":
            node["widgets_values"][:2] = [size, size]
        elif node["type"] == "KSampler":
            node["widgets_values"][2] = steps  # seed, control, steps, cfg, sampler, scheduler, denoise
        elif node["type"] == "ZImageVL_Encode":
            node["widgets_values"][4] = 64  # prompt, layers, token_mode, placement, max_image_tokens, ...
    return wf
