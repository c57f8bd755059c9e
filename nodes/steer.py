"""Steering directions: estimate from contrastive image sets, apply to conditioning, combine."""
from __future__ import annotations

import logging

import comfy.utils
from comfy_api.latest import io

from ..vl_core import extract, layer_mix, preprocess
from ..vl_core.steer import (ESTIMATORS, apply_directions, check_direction_for, combine_directions, direction_report,
                             require_direction, steering_direction)
from .backends import vl_encoder
from .common import CATEGORY, backend_inputs, check_conditioning, map_conditioning, validation_answer
from .references import connected, growing, parse_weights

log = logging.getLogger("comfyui-zimage-vl")

VLDirectionType = io.Custom("VL_DIRECTION")
ENCODE_CHUNK = 8      # images per encode_many call: batched forwards, and a progress tick per chunk


def encode_images(encoder, batches: list[tuple[str, object]], prompt: str, layers: list[int], max_image_tokens: int,
                  token_mode: str, layer_weights: dict[int, float] | None = None) -> list[list]:
    """Encode every image of several IMAGE batches with one prompt: same-size images go through one forward
    (encoder.encode_many, ENCODE_CHUNK at a time, a progress tick each), each encode given the layer mix
    (layer_mix.apply_mix); returns one VLEmbeds list per batch."""
    pictures, owners = [], []
    for k, (name, batch) in enumerate(batches):
        for i in range(batch.shape[0]):
            pictures.append(preprocess.fit_image(batch[i:i + 1], max_image_tokens, "fit_budget", f"{name} image {i + 1}"))
            owners.append(k)
    pbar = comfy.utils.ProgressBar(len(pictures))
    encoded = []
    for start in range(0, len(pictures), ENCODE_CHUNK):
        chunk = pictures[start:start + ENCODE_CHUNK]
        encoded += encoder.encode_many(chunk, prompt, layers, "after_image")
        pbar.update(len(chunk))
    encoded = [layer_mix.apply_mix(extract.select_tokens(e, token_mode), layers, layer_weights) for e in encoded]
    return [[e for e, owner in zip(encoded, owners) if owner == k] for k in range(len(batches))]


class SteeringDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_SteeringDirection",
            display_name="VL Steering Direction",
            category=CATEGORY,
            search_aliases=["steering", "concept slider", "style transfer", "reference image", "reference"],
            description="Estimates a direction in Qwen3-VL space from paired image sets (positive i vs negative i, "
                        "same prompt): mean difference (CAA) or first principal component of the differences "
                        "(RepE). Untuned on real weights: check the report's agreement before trusting it.",
            inputs=[
                io.Image.Input("positive", tooltip="Images WITH the property (an IMAGE batch; use Batch Images to "
                                                   "join several)."),
                io.Image.Input("negative", tooltip="Images WITHOUT it, paired in order with the positives (same "
                                                   "count)."),
                io.String.Input("prompt", multiline=True, default="Describe this image.",
                                tooltip="Text read with every image (the same for both sets, so it cancels out)."),
                *backend_inputs(),
                io.String.Input("layers", default="-6",
                                tooltip="Hidden layer(s), Hugging Face numbering (-6 clean): '-6', '-6,-15' (mixed "
                                        "equally) or weighted '-6:0.7, -15:0.3' (normalised), as in VL Encode. Use "
                                        "the same layers as the VL Encode whose conditioning you steer."),
                io.Combo.Input("method", options=list(ESTIMATORS), default="mean_diff",
                               tooltip="mean_diff (CAA): mean of the paired differences; pca (RepE): their first "
                                       "principal direction (ignores pairs that differ in other ways)."),
                io.Int.Input("num_tokens", default=1, min=1, max=4096,
                             tooltip="1 = one vector added to every token; K > 1 = one vector per pooled token "
                                     "position (keeps where in the picture the difference is)."),
                io.Combo.Input("token_mode", options=list(extract.TOKEN_MODES), default="image",
                               tooltip="Which tokens of each encode are compared: image (the picture), full, text."),
                io.Int.Input("max_image_tokens", default=1024, min=1, max=16384, advanced=True,
                             tooltip="Token budget per image (1 token per 32×32 px); larger images are shrunk."),
                io.Boolean.Input("offload_after_encode", default=True, advanced=True,
                                 tooltip="Unload Qwen3-VL from the GPU after the encodes."),
            ],
            outputs=[VLDirectionType.Output(display_name="direction"), io.String.Output(display_name="report")],
        )

    @classmethod
    def validate_inputs(cls, layers: str = "-6") -> bool | str:  # only layers: ComfyUI checks the rest
        return validation_answer(layer_mix.parse_layer_spec, layers, 10_000)

    @classmethod
    def execute(cls, positive, negative, prompt: str, layers: str, method: str, num_tokens: int, token_mode: str,
                max_image_tokens: int, offload_after_encode: bool, clip=None, vl_model=None) -> io.NodeOutput:
        if not prompt or not prompt.strip():
            raise ValueError("prompt is empty: give the text read with every image, e.g. 'Describe this image.'")
        if positive.shape[0] != negative.shape[0]:
            raise ValueError(f"positive has {positive.shape[0]} images but negative has {negative.shape[0]}: the "
                             "sets are paired, give both the same number")
        encoder = vl_encoder(clip, vl_model)
        resolved, weights = layer_mix.parse_layer_spec(layers, encoder.num_layers)
        pos, neg = encode_images(encoder, [("positive", positive), ("negative", negative)], prompt, resolved,
                                 max_image_tokens, token_mode, weights)
        if offload_after_encode:
            encoder.offload()
        direction = steering_direction(pos, neg, method, num_tokens)
        report = direction_report(direction)
        return io.NodeOutput(direction, report, ui={"text": (report,)})


class ApplyDirection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_ApplyDirection",
            display_name="VL Apply Direction",
            category=CATEGORY,
            search_aliases=["steering", "concept slider", "style transfer", "reference"],
            description="Adds steering directions to Z-Image conditioning, each scaled to every token's RMS "
                        "(Z-Image's caption embedder RMS-normalises tokens, so only relative size counts).",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Z-Image text conditioning."),
                growing("directions", VLDirectionType, "direction_",
                        "A VL_DIRECTION (Steering Direction / Combine Directions). Connect one and another appears."),
                io.String.Input("strengths", default="0.2",
                                tooltip="One strength per connected direction, e.g. '0.2, -0.1'; one number = all. "
                                        "1 adds a step as loud as the token; negative pushes the other way; 0 = "
                                        "unchanged (exact)."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, directions: io.Autogrow.Type, strengths: str) -> io.NodeOutput:
        found = [require_direction(f"direction #{i + 1}", d) for i, d in enumerate(connected(directions))]
        if not found:
            raise ValueError("no direction connected: connect a VL_DIRECTION to 'directions'")
        check_conditioning(conditioning)
        for i, d in enumerate(found):     # before map_conditioning, so the message names the direction
            check_direction_for(d, conditioning[0][0].shape[-1], f"direction #{i + 1}")
        pairs = list(zip(found, parse_weights("strengths", strengths, len(found))))
        return io.NodeOutput(map_conditioning(conditioning, lambda c: apply_directions(c, pairs), found[0].width))


class CombineDirections(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_CombineDirections",
            display_name="VL Combine Directions",
            category=CATEGORY,
            description="Weighted sum of steering directions (optionally Gram–Schmidt-orthogonalised in order), with "
                        "a report: cosines between them, explained variance, per-pair agreement.",
            inputs=[
                growing("directions", VLDirectionType, "direction_",
                        "A VL_DIRECTION. Connect one and another socket appears."),
                io.String.Input("weights", default="",
                                tooltip="One weight per connected direction, e.g. '1, -0.5'; empty = all 1."),
                io.Boolean.Input("orthogonalize", default=False,
                                 tooltip="Remove from each direction its overlap with the earlier ones first, so "
                                         "they steer independently (the first is kept as is)."),
            ],
            outputs=[VLDirectionType.Output(display_name="direction"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, directions: io.Autogrow.Type, weights: str, orthogonalize: bool) -> io.NodeOutput:
        found = connected(directions)
        combined, report = combine_directions(found, parse_weights("weights", weights, len(found)), orthogonalize)
        return io.NodeOutput(combined, report, ui={"text": (report,)})
