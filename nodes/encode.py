"""Load Qwen3-VL (transformers) and VL Encode."""
from __future__ import annotations

import logging

import comfy.utils
from comfy_api.latest import io

from ..vl_core import extract, layer_mix, preprocess, stats
from .backends import vl_encoder
from .common import CATEGORY, VLEmbedsType, VLModelType, backend_inputs, validation_answer
from .model_folders import list_vl_folders, resolve_vl_folder
from .transformers_model import load_transformers_vl

log = logging.getLogger("comfyui-zimage-vl")


class LoadQwen3VL(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_LoadQwen3VL",
            display_name="Load Qwen3-VL (transformers)",
            category=CATEGORY,
            description="Loads a Hugging Face Qwen3-VL-4B folder (config.json + safetensors) from "
                        "models/text_encoders or models/LLM, offline. ComfyUI loads and offloads it like any model.",
            inputs=[
                io.Combo.Input("folder", options=list_vl_folders(),
                               tooltip="A Qwen3-VL folder under models/text_encoders or models/LLM "
                                       "(e.g. Qwen3-VL-4B-Instruct). Use the 4B: its 2560-d states match Z-Image."),
                io.Combo.Input("dtype", options=["auto", "bf16", "fp16", "fp32"], default="auto", advanced=True,
                               tooltip="Weight dtype. auto = what ComfyUI picks for text encoders on this device."),
            ],
            outputs=[VLModelType.Output(display_name="vl_model")],
        )

    @classmethod
    def execute(cls, folder: str, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(load_transformers_vl(resolve_vl_folder(folder), dtype))


class VLEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_Encode",
            display_name="VL Encode",
            category=CATEGORY,
            search_aliases=["ipadapter", "ip-adapter", "redux", "image prompt", "reference image", "reference",
                            "clip vision encode", "image encoder", "qwen3-vl"],
            description="Reads a reference image + prompt with Qwen3-VL and returns its hidden states "
                        "(≈1 token per 32×32 px) for the blend / inspect / injection nodes.",
            inputs=[
                io.Image.Input("image", tooltip="The reference image (one RGB image)."),
                io.String.Input("prompt", multiline=True, default="Describe this image.",
                                tooltip="Text read together with the image. Usually your Z-Image prompt or a short "
                                        "description; it must not be empty."),
                *backend_inputs(),
                io.String.Input("layers", default="-6",
                                tooltip="Hidden layer(s) to keep, Hugging Face numbering (-1 = final, -2 = Z-Image's "
                                        "own text layer). -6 gives clean results; -2 shows grid artifacts. Several: "
                                        "'-6,-2' (mixed equally downstream), or weighted: '-6:0.7, -15:0.3' "
                                        "(normalised to sum 1). VL Select Layers re-picks per consumer."),
                io.Combo.Input("token_mode", options=list(extract.TOKEN_MODES), default="full",
                               tooltip="full: all tokens; image: only the image tokens (the ones that carry the "
                                       "picture); text: only non-image tokens (carries no image: for comparison)."),
                io.Combo.Input("placement", options=list(extract.PLACEMENTS), default="after_image",
                               tooltip="Where the prompt sits. The model is causal: after_image lets the text see "
                                       "the image; before_image lets the image tokens see the text."),
                io.Int.Input("max_image_tokens", default=1024, min=1, max=16384, advanced=True,
                             tooltip="Token budget for the image (1 token per 32×32 px; 1024 = 1024² px)."),
                io.Combo.Input("resize", options=list(preprocess.RESIZE_POLICIES), default="fit_budget",
                               advanced=True,
                               tooltip="fit_budget: downscale (keeping aspect) to fit max_image_tokens; "
                                       "none: only snap to multiples of 32 px, refuse images over the budget."),
                io.Float.Input("outlier_threshold", default=10.0, min=1.01, max=10000.0, step=0.5, advanced=True,
                               tooltip="A dim is an outlier when its image-token std is this many times louder "
                                       "OR quieter than in the text tokens (dim 396 is ~617× quieter)."),
                io.Combo.Input("outlier_mode", options=list(stats.OUTLIER_MODES), default="none", advanced=True,
                               tooltip="What to do with outlier dims in the image tokens: none, zero them, clamp "
                                       "to the text range, or scale them to the text std."),
                io.Boolean.Input("offload_after_encode", default=True, optional=True, advanced=True,
                                 tooltip="Unload the Qwen3-VL model from the GPU right after encoding, so it is "
                                         "never resident while Z-Image samples (it reloads on the next encode)."),
            ],
            outputs=[VLEmbedsType.Output(display_name="vl_embeds")],
        )

    @classmethod
    def validate_inputs(cls, layers: str = "-6") -> bool | str:
        # Only `layers` is named (no **kwargs): ComfyUI 0.29 then keeps its own type / min / max / option
        # checks for every other input and reports a failure here once, under `layers`.
        return validation_answer(layer_mix.parse_layer_spec, layers, 10_000)

    @classmethod
    def execute(cls, image, prompt: str, layers: str, token_mode: str, placement: str, max_image_tokens: int,
                resize: str, outlier_threshold: float, outlier_mode: str, clip=None, vl_model=None,
                offload_after_encode: bool = True) -> io.NodeOutput:
        if not prompt or not prompt.strip():
            raise ValueError("prompt is empty: VL Encode reads the image together with text; give your Z-Image "
                             "prompt or a short description such as 'a photo'")
        encoder = vl_encoder(clip, vl_model)
        resolved, weights = layer_mix.parse_layer_spec(layers, encoder.num_layers)
        if resolved and max(resolved) >= encoder.num_layers - 1:
            log.warning("VL Encode: layers near the end (-1/-2) give grid artifacts with Z-Image; -6 is cleaner")
        if token_mode == "text":
            log.warning("VL Encode: token_mode 'text' drops the image tokens, so the result carries no image")

        pbar = comfy.utils.ProgressBar(3)
        picture = preprocess.fit_image(image, max_image_tokens, resize)
        pbar.update(1)
        embeds = encoder.encode([picture], prompt, resolved, placement)
        if offload_after_encode:
            encoder.offload()
        extract.require_finite_states(embeds, "image", 0, picture)
        pbar.update(1)
        embeds = stats.suppress_image_outliers(embeds, outlier_threshold, outlier_mode)
        embeds = extract.select_tokens(embeds, token_mode)
        if weights is not None:
            embeds = layer_mix.select_layers(embeds, resolved, weights)
        pbar.update(1)
        return io.NodeOutput(embeds)
