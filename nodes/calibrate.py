"""Fit / Apply Calibration: a map from Qwen3-VL hidden space to Z-Image's text space, fitted on text prompts."""
from __future__ import annotations

import logging
import os

import comfy.utils
from comfy_api.latest import io

from ..vl_core import extract
from ..vl_core.checks import require_width
from ..vl_core.calibrate import (FITS, VLCalibration, apply_calibration, calibration_report, fit_calibration,
                                 load_prompts)
from .common import CATEGORY, VLEmbedsType, backend_inputs, check_vl_embeds
from .backends import vl_encoder

log = logging.getLogger("comfyui-zimage-vl")

VLCalibrationType = io.Custom("VL_CALIBRATION")
SHIPPED_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vl_core", "data",
                               "calibration_prompts.txt")


def vl_tokenizer(encoder):
    """The Hugging Face tokenizer of either backend (native: the clip's; transformers: the folder's)."""
    tok = getattr(encoder, "hf_tokenizer", None) or getattr(getattr(encoder, "encoder", None), "tokenizer", None)
    if tok is None:
        raise ValueError(f"cannot read the tokenizer of {type(encoder).__name__}: use VL Encode's backends")
    return tok


def text_ids_and_states(text_clip, prompt: str):
    """(ids, states [N, D]) of Z-Image's text encoder for a prompt, as CLIPTextEncode encodes it."""
    tokens = text_clip.tokenize(prompt)
    rows = next(iter(tokens.values()))
    ids = [t[0] if isinstance(t[0], int) else None for row in rows for t in row]
    cond = text_clip.encode_from_tokens(tokens)
    return ids, cond[0].float().cpu()


def aligned_pairs(encoder, text_clip, prompts: list[str], layers: list[int]):
    """Token-aligned (VL [N, D], text [N, D]) pairs; a prompt whose token ids differ between the two encoders'
    tokenizers (or whose token counts differ) is dropped. Returns (pairs, dropped prompts)."""
    tok = vl_tokenizer(encoder)
    pairs, dropped = [], []
    pbar = comfy.utils.ProgressBar(len(prompts))
    for prompt in prompts:
        before, text, after = extract.chat_pieces(prompt, 0, "after_image")
        vl_ids = tok(before + text + after, add_special_tokens=False)["input_ids"]
        text_ids, text_states = text_ids_and_states(text_clip, prompt)
        if vl_ids != text_ids:
            dropped.append(prompt)
        else:
            vl = encoder.encode([], prompt, layers, "after_image")
            x = vl.tokens()[0].float().cpu()
            if not pairs:   # fail fast, before encoding every prompt
                require_width("Qwen3-VL", x.shape[-1], "Z-Image's text encoder (text_clip)", text_states.shape[-1])
            if x.shape[0] == text_states.shape[0]:
                pairs.append((x, text_states))
            else:
                dropped.append(prompt)
        pbar.update(1)
    return pairs, dropped


class FitCalibration(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_FitCalibration",
            display_name="VL Fit Calibration",
            category=CATEGORY,
            description="Fits a map from Qwen3-VL hidden space (at the VL layer you use) to Z-Image's own text "
                        "encoder space, from text-only prompts run through both (same vocabulary and template, so "
                        "tokens align one to one). Reports held-out error against the identity map.",
            inputs=[
                io.Clip.Input("text_clip", tooltip="Z-Image's text encoder: Qwen3-4B from CLIPLoader, type lumina2 "
                                                   "(the one feeding CLIPTextEncode)."),
                *backend_inputs(),
                io.String.Input("layers", default="-6",
                                tooltip="VL layer(s) to map from: the same as your VL Encode's layers."),
                io.Combo.Input("kind", options=list(FITS), default="affine",
                               tooltip="affine: y_d = a_d·x_d + b_d per dimension (few parameters, robust); linear: "
                                       "a full ridge-regularised D×D map (λ chosen on held-out prompts; needs more "
                                       "tokens than dims)."),
                io.Boolean.Input("use_shipped_prompts", default=True,
                                 tooltip="Include the pack's 220 varied prompts "
                                         "(vl_core/data/calibration_prompts.txt)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="Your own prompts, one per line (added to the shipped ones)."),
                io.Int.Input("max_prompts", default=0, min=0, max=100000, advanced=True,
                             tooltip="Use at most this many prompts (0 = all)."),
            ],
            outputs=[VLCalibrationType.Output(display_name="calibration"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, text_clip, layers: str, kind: str, use_shipped_prompts: bool, prompts: str, max_prompts: int,
                clip=None, vl_model=None) -> io.NodeOutput:
        items = (load_prompts(SHIPPED_PROMPTS) if use_shipped_prompts else []) + [
            line.strip() for line in (prompts or "").splitlines() if line.strip()]
        if max_prompts:
            items = items[:max_prompts]
        if not items:
            raise ValueError("no prompts: turn use_shipped_prompts on or write prompts, one per line")
        if text_clip is None or not hasattr(text_clip, "tokenize"):
            raise ValueError("text_clip must be Z-Image's text encoder CLIP (CLIPLoader, qwen_3_4b, type lumina2)")
        encoder = vl_encoder(clip, vl_model)
        resolved = extract.parse_layers(layers, encoder.num_layers)
        pairs, dropped = aligned_pairs(encoder, text_clip, items, resolved)
        encoder.offload()
        if dropped:
            log.warning("VL Fit Calibration: %d of %d prompts dropped (token ids differ between the encoders)",
                        len(dropped), len(items))
        if not pairs:
            raise ValueError(f"all {len(items)} prompts were dropped: the two encoders' token ids differ for every "
                             "prompt; text_clip must be Z-Image's Qwen3-4B (same vocabulary as Qwen3-VL)")
        cal = fit_calibration(pairs, kind, resolved, encoder.num_layers, text_layer="Z-Image conditioning (-2)")
        for w in cal.warnings:
            log.warning("VL Fit Calibration: %s", w)
        report = calibration_report(cal, dropped=len(dropped), total=len(items))
        if dropped:
            more = " …" if len(dropped) > 5 else ""
            report += "\ndropped: " + "; ".join(repr(p[:60]) for p in dropped[:5]) + more
        return io.NodeOutput(cal, report, ui={"text": (report,)})


class ApplyCalibration(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_ApplyCalibration",
            display_name="VL Apply Calibration",
            category=CATEGORY,
            description="Maps the image tokens (or all tokens) of a VL_EMBEDS through a fitted calibration into "
                        "Z-Image's text space. Feed the result to VL Inspect to see the per-dim ratio after it.",
            inputs=[
                VLEmbedsType.Input("vl_embeds", tooltip="From VL Encode, at the calibration's layer(s)."),
                VLCalibrationType.Input("calibration", tooltip="From VL Fit Calibration."),
                io.Boolean.Input("image_tokens_only", default=True,
                                 tooltip="Map only the image tokens (the text tokens are text already); off = all."),
            ],
            outputs=[VLEmbedsType.Output(display_name="vl_embeds")],
        )

    @classmethod
    def execute(cls, vl_embeds, calibration, image_tokens_only: bool) -> io.NodeOutput:
        vl = check_vl_embeds("vl_embeds", vl_embeds)
        if not isinstance(calibration, VLCalibration):
            raise ValueError(f"calibration must come from VL Fit Calibration, got {type(calibration).__name__}")
        return io.NodeOutput(apply_calibration(calibration, vl, image_tokens_only))
