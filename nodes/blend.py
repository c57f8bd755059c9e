"""Embedding-level mixing of VL hidden states into Z-Image text conditioning."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..vl_core import techniques
from ..vl_core.normalize import NORMALIZE_METHODS
from ..vl_core.pooling import LENGTH_METHODS
from .common import CATEGORY, VLEmbedsType, check_vl_embeds, map_conditioning, vl_tokens_like

log = logging.getLogger("comfyui-zimage-vl")

LENGTH_TOOLTIP = ("How the VL tokens (~1 per 32×32 px) are matched to the text's token count: pool = area average "
                  "over all tokens; attention_pool = each text token gathers the VL tokens it resembles; "
                  "truncate = first tokens only (mostly template + top rows: for comparison).")


class EmbeddingBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_EmbeddingBlend",
            display_name="VL Embedding Blend",
            category=CATEGORY,
            search_aliases=["ipadapter", "ip-adapter", "redux", "image prompt", "style transfer", "reference image",
                            "reference", "style model"],
            description="Mixes Qwen3-VL states of a reference image into Z-Image text conditioning. "
                        "alpha 0.3 = slight style, 0.5 = strong, 0.7 = the reference dominates, 1.0 ≈ reconstructs it.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Z-Image text conditioning (CLIPTextEncode with "
                                                              "Z-Image's Qwen3-4B)."),
                VLEmbedsType.Input("vl_embeds", tooltip="From VL Encode or Load VL Embeddings (Qwen3-VL-4B: same "
                                                        "2560-d width as Z-Image's text encoder)."),
                io.Float.Input("alpha", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of the reference: 0 = text only (exact), 0.3 slight style, 0.5 strong, "
                                       "0.7 reference dominates, 1.0 ≈ reconstructs the reference. With concat: "
                                       "share of token_budget appended."),
                io.Combo.Input("mode", options=list(techniques.BLEND_MODES), default="linear",
                               tooltip="linear: (1-α)·text + α·vl; slerp: rotate each token's direction, "
                                       "interpolate its norm; graduated: per-token α rising from α/N to α "
                                       "(early tokens stay text)."),
                io.Combo.Input("length", options=list(techniques.BLEND_LENGTHS), default="pool",
                               tooltip=LENGTH_TOOLTIP + " concat = keep the text and append VL tokens "
                                                        "(no mixing; alpha sets how many)."),
                io.Combo.Input("normalize", options=list(NORMALIZE_METHODS), default="global",
                               tooltip="Match the VL statistics to this text conditioning first: global (one mean/"
                                       "std), per_dim (each dim: moves colour, can corrupt identity), hybrid (per-dim "
                                       "mean, global scale), none."),
                io.Int.Input("token_budget", default=0, min=0, max=8192, advanced=True,
                             tooltip="concat only: most VL tokens to append (area-pooled); 0 = all of them."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, vl_embeds, alpha: float, mode: str, length: str, normalize: str,
                token_budget: int) -> io.NodeOutput:
        vl = check_vl_embeds("vl_embeds", vl_embeds)
        return io.NodeOutput(map_conditioning(conditioning, lambda cond: techniques.embedding_blend(
            cond, vl_tokens_like(vl, cond), alpha, mode, length, normalize, token_budget), vl.width))


class StyleDelta(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_StyleDelta",
            display_name="VL Style Delta",
            category=CATEGORY,
            search_aliases=["style transfer", "reference image", "reference", "style delta"],
            description="Adds VL(style image) − VL(neutral image), both encoded with the SAME prompt, to the text "
                        "conditioning. Warning: this arithmetic tends to destroy content; keep strength low.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Z-Image text conditioning."),
                VLEmbedsType.Input("vl_style", tooltip="VL Encode of the style reference."),
                VLEmbedsType.Input("vl_neutral", tooltip="VL Encode of a neutral image (e.g. a plain photo or grey "
                                                         "card) with the same prompt and settings."),
                io.Float.Input("strength", default=0.3, min=-2.0, max=2.0, step=0.05,
                               tooltip="How much of the difference to add; 0 = text only (exact)."),
                io.Boolean.Input("normalize", default=True,
                                 tooltip="Rescale the delta so its per-token RMS equals the text's (strength is "
                                         "then relative to the text)."),
                io.Combo.Input("length", options=list(LENGTH_METHODS), default="pool",
                               tooltip=LENGTH_TOOLTIP),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, vl_style, vl_neutral, strength: float, normalize: bool,
                length: str) -> io.NodeOutput:
        style = check_vl_embeds("vl_style", vl_style)
        neutral = check_vl_embeds("vl_neutral", vl_neutral)
        if style.width != neutral.width:
            raise ValueError(f"vl_style is {style.width}-d but vl_neutral is {neutral.width}-d: encode both with the "
                             "same Qwen3-VL model")
        if style.prompt != neutral.prompt or style.layers != neutral.layers:
            log.warning("VL Style Delta: vl_style and vl_neutral differ in prompt or layers; the delta then "
                        "carries that difference too")
        return io.NodeOutput(map_conditioning(conditioning, lambda cond: techniques.embedding_style_delta(
            cond, vl_tokens_like(style, cond), vl_tokens_like(neutral, cond), strength, normalize, length),
            style.width))


class AdaIN(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_AdaIN",
            display_name="VL AdaIN",
            category=CATEGORY,
            search_aliases=["adain", "style transfer", "reference image", "reference"],
            description="Gives the text conditioning the VL statistics (adaptive instance normalisation). "
                        "per_token keeps content but transfers little; per_dim transfers colour but corrupts identity.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Z-Image text conditioning (the content)."),
                VLEmbedsType.Input("vl_embeds", tooltip="VL Encode of the style reference."),
                io.Combo.Input("mode", options=list(techniques.ADAIN_STYLE_TOKENS), default="per_dim",
                               tooltip="per_token: each token takes a VL token's mean/std over dims; per_dim: each "
                                       "dim takes the VL mean/std over tokens."),
                io.Float.Input("weight", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Mix between the text (0, exact) and the fully re-normalised text (1)."),
                io.Combo.Input("length", options=list(LENGTH_METHODS), default="pool",
                               tooltip="per_token only: " + LENGTH_TOOLTIP),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, conditioning, vl_embeds, mode: str, weight: float, length: str) -> io.NodeOutput:
        vl = check_vl_embeds("vl_embeds", vl_embeds)
        return io.NodeOutput(map_conditioning(conditioning, lambda cond: techniques.embedding_adain(
            cond, vl_tokens_like(vl, cond), mode, weight, length), vl.width))
