"""Fit / Apply Calibration: a map from Qwen3-VL hidden space to Z-Image's text space, fitted on text prompts."""
from __future__ import annotations

import logging
import numbers
import os

import comfy.utils
from comfy_api.latest import io

from ..vl_core import layer_mix
from ..vl_core.checks import require_width
from ..vl_core.encoders.batching import length_batches
from ..vl_core.calibrate import (FITS, VLCalibration, apply_calibration, calibration_report, fit_calibration,
                                 load_prompts)
from .common import CATEGORY, VLEmbedsType, backend_inputs, check_vl_embeds, validation_answer
from .backends import vl_encoder

log = logging.getLogger("comfyui-zimage-vl")

VLCalibrationType = io.Custom("VL_CALIBRATION")
SHIPPED_PROMPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vl_core", "data",
                               "calibration_prompts.txt")


TEXT_BATCH_TOKENS = 8192     # padded tokens per Z-Image text-encoder call
VL_CHUNK = 32                # prompts per VL encode_texts call (a progress tick each)


def text_row(text_clip, prompt: str, index: int) -> tuple[str, list]:
    """(key, token row) of Z-Image's text encoder for a prompt, as CLIPTextEncode tokenizes it (one row)."""
    tokens = text_clip.tokenize(prompt)
    if len(tokens) != 1 or len(next(iter(tokens.values()))) != 1:
        raise ValueError(f"text_clip split prompt #{index + 1} into {sum(len(v) for v in tokens.values())} token "
                         "rows: text_clip must be Z-Image's text encoder (CLIPLoader, qwen_3_4b, type lumina2)")
    key, rows = next(iter(tokens.items()))
    return key, list(rows[0])


def row_ids(row: list) -> list:
    """The token ids of a row (None where ComfyUI put an embedding instead of an id)."""
    return [int(t[0]) if isinstance(t[0], numbers.Integral) else None for t in row]


def text_states(text_clip, key: str, rows: list[list], tick=None, max_tokens: int = TEXT_BATCH_TOKENS) -> list:
    """Z-Image text-encoder states [N_i, D] (float32, CPU) of several prompts' token rows, batched.

    ComfyUI's CLIP API has no several-prompt encode, but encode_from_tokens runs all rows of one token dict (the
    sections of a long prompt) as one batch through one forward and returns them side by side. Rows must be
    equally long, so each is right-padded with copies of its own last token: the Qwen3 LM is causal, no token
    sees the padding after it, and prompt i's states are the first N_i of its section (equal to its own encode
    to float rounding; padding tokens get attention-mask 1, they are dropped here).
    """
    out: list = [None] * len(rows)
    for batch in length_batches([len(r) for r in rows], max_tokens):
        longest = len(rows[batch[0]])
        padded = [rows[i] + [rows[i][-1]] * (longest - len(rows[i])) for i in batch]
        cond = text_clip.encode_from_tokens({key: padded})
        if cond.ndim != 3 or cond.shape[1] != len(batch) * longest:
            raise RuntimeError(f"text_clip returned {tuple(cond.shape)} for {len(batch)} rows of {longest} tokens")
        cond = cond[0].float().cpu().reshape(len(batch), longest, -1)
        for row, i in enumerate(batch):
            out[i] = cond[row, :len(rows[i])].clone()
        if tick is not None:
            tick(len(batch))
    return out


def aligned_pairs(encoder, text_clip, prompts: list[str], layers: list[int],
                  layer_weights: dict[int, float] | None = None):
    """Token-aligned (VL [N, D], text [N, D]) pairs, both encoders batched (a progress tick per prompt on each).

    A prompt whose token ids differ between the ids the VL encode runs (encoder.text_ids) and Z-Image's text
    encoder's tokens is dropped before anything is encoded. Returns (pairs, dropped prompts)."""
    pbar = comfy.utils.ProgressBar(2 * len(prompts))
    kept, rows, dropped, key = [], [], [], None
    for i, prompt in enumerate(prompts):
        row_key, row = text_row(text_clip, prompt, i)
        try:
            vl_ids = encoder.text_ids(prompt, "after_image")
        except ValueError:            # vision tokens in the prompt: the VL encode refuses it
            vl_ids = None
        if vl_ids is None or vl_ids != row_ids(row):
            dropped.append(prompt)
            pbar.update(2)
            continue
        key = row_key
        kept.append(prompt)
        rows.append(row)
    if not kept:
        return [], dropped
    texts = text_states(text_clip, key, rows, tick=pbar.update)
    require_width("Qwen3-VL", encoder.width, "Z-Image's text encoder (text_clip)", texts[0].shape[-1])
    pairs = []
    for start in range(0, len(kept), VL_CHUNK):
        chunk = kept[start:start + VL_CHUNK]
        for prompt, vl, y in zip(chunk, encoder.encode_texts(chunk, layers, "after_image"), texts[start:]):
            x = layer_mix.apply_mix(vl, layers, layer_weights).tokens()[0].float().cpu()
            if x.shape[0] == y.shape[0]:
                pairs.append((x, y))
            else:
                dropped.append(prompt)
        pbar.update(len(chunk))
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
                                tooltip="VL layer(s) to map from, the same as your VL Encode's layers: '-6', "
                                        "'-6,-15' (mixed equally) or weighted '-6:0.7, -15:0.3' (normalised)."),
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
    def validate_inputs(cls, layers: str = "-6") -> bool | str:  # only layers: ComfyUI checks the rest
        return validation_answer(layer_mix.parse_layer_spec, layers, 10_000)

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
        resolved, weights = layer_mix.parse_layer_spec(layers, encoder.num_layers)
        pairs, dropped = aligned_pairs(encoder, text_clip, items, resolved, weights)
        encoder.offload()
        if dropped:
            log.warning("VL Fit Calibration: %d of %d prompts dropped (token ids differ between the encoders)",
                        len(dropped), len(items))
        if not pairs:
            raise ValueError(f"all {len(items)} prompts were dropped: the two encoders' token ids differ for every "
                             "prompt; text_clip must be Z-Image's Qwen3-4B (same vocabulary as Qwen3-VL)")
        cal = fit_calibration(pairs, kind, resolved, encoder.num_layers, text_layer="Z-Image conditioning (-2)",
                              vl_layer_weights=weights)
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
