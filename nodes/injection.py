"""DiT Layer Injection: VL conditioning inside chosen Z-Image main blocks and timesteps (the node).

schema → InjectionSettings (vl_core, validated once) → an Injection of the chosen method installed on
``model.clone()`` under this node application's own key, so several injections compose on one model and
applying the same node again replaces only its own hooks (LoRA weight patches, other patches, wrappers and
attention overrides all survive). The methods are in injection_methods.py (a registry: the `method` Combo
lists it), the ModelPatcher glue in injection_hooks.py, the Z-Image model glue in zimage_model.py.
Nothing is patched at import time and nothing global is modified.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..vl_core import inject, pooling, schedule  # noqa: F401  (re-exported for scripts and tests)
from ..vl_core.checks import require_width
from ..vl_core.inject_settings import VL_ROPE, InjectionSettings
from .common import CATEGORY, VLEmbedsType, check_vl_embeds
from .injection_hooks import (PATCH_KEY, STATE_KEY, Injection, injection_key, install_injection,  # noqa: F401
                              remove_injection, sigma_reader)
from .injection_methods import METHODS, method_named
from .zimage_model import caption_width, embed_like_caption, zimage_diffusion_model  # noqa: F401

WIDTH_HINT = ("use Qwen3-VL-4B (its 2560-d hidden states match Z-Image's Qwen3-4B text encoder); "
              "Qwen3-VL-8B (4096-d) and other encoders cannot condition Z-Image")


def build_injection(model, vl, *, method: str, node_id=None, **settings) -> Injection:
    """Validate everything against the model and return the Injection (raises ValueError with the fix).

    settings: the node's inputs strength … vl_rope (schedule may also be given as schedule_name); node_id names
    the application (its key, injection_key(node_id)): None = the one fixed key of a script.
    """
    chosen = method_named(method)
    vl = check_vl_embeds("vl_embeds", vl)
    dit = zimage_diffusion_model(model)
    require_width("VL embeddings", vl.width, "the Z-Image caption embedder (cap_embedder) input", caption_width(dit),
                  hint=WIDTH_HINT)
    if "schedule_name" in settings:
        settings["schedule"] = settings.pop("schedule_name")
    validated = InjectionSettings(method=chosen.traits, num_blocks=len(dit.layers), **settings)
    tokens = vl.tokens().detach().to(device="cpu", dtype=torch.float32)
    if tokens.shape[1] == 0:
        raise ValueError("vl_embeds has no tokens: check the token mode / spans of the encoding")
    tokens = tokens.reshape(1, -1, tokens.shape[-1])  # several images: their tokens side by side
    return Injection(chosen, validated, tokens, key=injection_key(node_id))


def apply_injection(model, vl, *, node_id=None, **settings):
    """model.clone() with the injection installed (the node's execute, usable from scripts and the bench).
    The same node_id replaces an earlier injection; another adds one after those already there."""
    injection = build_injection(model, vl, node_id=node_id, **settings)
    patched = model.clone()
    install_injection(patched, injection)
    return patched


# --------------------------------------------------------------------------- node

class DiTInjection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_DiTInjection",
            display_name="DiT Layer Injection",
            category=CATEGORY,
            search_aliases=["ipadapter", "ip-adapter", "redux", "image prompt", "style transfer", "reference image",
                            "reference", "attention injection"],
            description="Training-free reference-image conditioning inside chosen Z-Image blocks and steps. "
                        "extra_attention: image tokens also attend to the VL tokens (IP-Adapter-like, keeps the "
                        "prompt); caption_stream: the caption stream is pulled toward the VL tokens in the chosen "
                        "blocks; concat: VL tokens appended to the caption (baseline).",
            inputs=[
                io.Model.Input("model", tooltip="Z-Image Turbo (UNETLoader → ModelSamplingAuraFlow)."),
                VLEmbedsType.Input("vl_embeds", tooltip="From VL Encode / Load VL Embeddings (Qwen3-VL-4B, 2560-d)."),
                io.Combo.Input("method", options=list(METHODS), default="extra_attention",
                               tooltip="extra_attention: in the chosen blocks image tokens additionally attend to "
                                       "the VL tokens (separate softmax, scaled by strength); caption_stream: after "
                                       "each chosen block the caption tokens move toward the VL tokens embedded like "
                                       "a caption; concat: token_budget VL tokens appended to the caption in every "
                                       "block (ignores strength and block_weights)."),
                io.Float.Input("strength", default=0.5, min=-2.0, max=4.0, step=0.05,
                               tooltip="Multiplies every block weight: extra_attention scale, caption_stream lerp "
                                       "weight (1 = caption replaced in that block). Must not be 0 (refused): "
                                       "bypass the node for the unchanged model."),
                io.String.Input("block_weights", default="all",
                                tooltip="Which main blocks and how much: 'all', 'early' (structure), 'middle', "
                                        "'late' (detail), or '0-9:1.0, 10-19:0.5, 27:0' (0-based, later entries win, "
                                        "unnamed blocks 0; Z-Image has 30 blocks)."),
                io.Combo.Input("caption_mode", options=list(inject.CAPTION_MODES), default="lerp",
                               tooltip="caption_stream only: lerp = txt + w·(vl − txt); add = txt + w·vl."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First sampling percent the injection acts at (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Last sampling percent the injection acts at (1 = last step)."),
                io.Combo.Input("schedule", options=list(schedule.SCHEDULES), default="constant",
                               tooltip="Strength over [start, end]: constant, linear_up (0→1), linear_down (1→0), "
                                       "cosine (smooth 1→0)."),
                io.Combo.Input("apply_to", options=list(inject.APPLY_TO), default="cond_only",
                               tooltip="cond_only: only the positive (conditional) half of a CFG batch; both: also "
                                       "the negative. With CFG 1 (Turbo) there is only the positive."),
                io.Int.Input("token_budget", default=256, min=0, max=8192, advanced=True,
                             tooltip="extra_attention / concat: VL tokens kept (area-pooled; 0 = all, ~1 per 32×32 "
                                     "px). Cost grows with it."),
                io.Combo.Input("vl_rope", options=list(VL_ROPE), default="none", advanced=True,
                               tooltip="extra_attention: RoPE of the VL keys. none = position-free set (rotation by "
                                       "position 0, one slot before the caption); caption = positions 1..n like a "
                                       "caption."),
            ],
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],  # this application's key: chained injections each keep their own
        )

    @classmethod
    def execute(cls, model, vl_embeds, method: str, strength: float, block_weights: str, caption_mode: str,
                start_percent: float, end_percent: float, schedule: str, apply_to: str, token_budget: int,
                vl_rope: str) -> io.NodeOutput:
        hidden = getattr(cls, "hidden", None)
        patched = apply_injection(model, vl_embeds, node_id=getattr(hidden, "unique_id", None),
                                  method=method, strength=strength, block_weights=block_weights,
                                  caption_mode=caption_mode, start_percent=start_percent, end_percent=end_percent,
                                  schedule=schedule, apply_to=apply_to, token_budget=token_budget, vl_rope=vl_rope)
        return io.NodeOutput(patched)
