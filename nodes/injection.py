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

import logging

from ..vl_core import inject, pooling, schedule  # noqa: F401  (re-exported for scripts and tests)
from ..vl_core.checks import require_finite, require_width
from ..vl_core.inject_extra import KV_SCALES, SHARES
from ..vl_core.inject_settings import REFERENCE_NOISE, VL_ROPE, InjectionSettings
from ..vl_core.references import reference_layout
from ..vl_core.steer import check_direction_for
from .common import CATEGORY, VLDirectionType, VLEmbedsType, check_vl_embeds
from .injection_hooks import (PATCH_KEY, STATE_KEY, Injection, InjectionInputs, injection_key,  # noqa: F401
                              install_injection, remove_injection, sigma_reader)
from .injection_methods import METHODS, method_named
from .zimage_model import caption_width, embed_like_caption, zimage_diffusion_model  # noqa: F401

log = logging.getLogger(__name__)
WIDTH_HINT = ("use Qwen3-VL-4B (its 2560-d hidden states match Z-Image's Qwen3-4B text encoder); "
              "Qwen3-VL-8B (4096-d) and other encoders cannot condition Z-Image")
VL_METHODS = ("extra_attention", "caption_stream", "concat")  # the methods that need vl_embeds


def vl_tokens(name: str, vl, width: int) -> tuple[torch.Tensor, list]:
    """[1, B·N, D] float32 CPU tokens of a VLEmbeds (several images side by side) and its per-reference spans."""
    vl = check_vl_embeds(name, vl)
    require_width(name, vl.width, "the Z-Image caption embedder (cap_embedder) input", width, hint=WIDTH_HINT)
    tokens = vl.tokens().detach().to(device="cpu", dtype=torch.float32)
    if tokens.shape[1] == 0:
        raise ValueError(f"{name} has no tokens: check the token mode / spans of the encoding")
    b, n = tokens.shape[:2]
    spans = [((row * n + s, row * n + e), w) for row in range(b) for (s, e), w in reference_layout(vl)]
    return tokens.reshape(1, -1, tokens.shape[-1]), spans


def reference_latent(reference, reference_image, vae, channels: int) -> torch.Tensor:
    """[1, C, h, w] float32 CPU VAE latent of the reference (a LATENT, or an IMAGE encoded with the VAE)."""
    if reference is not None and reference_image is not None:
        raise ValueError("connect either reference (a LATENT) or reference_image + vae, not both")
    if reference_image is not None:
        if vae is None or not hasattr(vae, "encode"):
            raise ValueError("reference_image needs a vae (the Z-Image / Flux VAE from VAELoader) to encode it")
        if not torch.is_tensor(reference_image) or reference_image.ndim != 4 or reference_image.shape[0] < 1 \
                or min(reference_image.shape[1:3]) < 16 or reference_image.shape[-1] < 3:
            raise ValueError(f"reference_image must be an IMAGE [B, H, W, 3] of at least 16×16 px, got "
                             f"{tuple(getattr(reference_image, 'shape', ()))}")
        require_finite("reference_image", reference_image)
        if reference_image.shape[0] != 1:
            raise ValueError(f"reference_image holds {reference_image.shape[0]} images: pass one (ImageFromBatch), "
                             "or chain one injection per reference")
        samples = vae.encode(reference_image[..., :3])
    else:
        if not isinstance(reference, dict) or not torch.is_tensor(reference.get("samples")):
            raise ValueError(f"reference must be a LATENT (from VAEEncode), got {type(reference).__name__}")
        samples = reference["samples"]
    if samples.ndim != 4:
        raise ValueError(f"reference latent must be [B, C, h, w], got {tuple(samples.shape)}")
    if samples.shape[1] != channels:
        raise ValueError(f"reference latent has {samples.shape[1]} channels, Z-Image's DiT takes {channels}: encode "
                         "the reference with Z-Image's VAE (ae.safetensors, 16-channel Flux VAE), not an SD VAE")
    if samples.shape[0] != 1:
        raise ValueError(f"reference holds {samples.shape[0]} latents: pass one (LatentFromBatch), or chain one "
                         "injection per reference")
    require_finite("reference latent", samples)
    return samples.detach().to(device="cpu", dtype=torch.float32)


def region_mask(mask) -> torch.Tensor:
    """[Bm, H, W] float32 CPU mask with values in [0, 1]."""
    if not torch.is_tensor(mask) or mask.ndim not in (2, 3) or mask.numel() == 0 or min(mask.shape[-2:]) < 1:
        raise ValueError(f"mask must be a MASK [B, H, W] or [H, W], got {tuple(getattr(mask, 'shape', ()))}")
    require_finite("mask", mask)
    m = mask.detach().to(device="cpu", dtype=torch.float32)
    if float(m.min()) < 0 or float(m.max()) > 1:
        raise ValueError(f"mask values must be in [0, 1] (per-token weights), got [{float(m.min()):g}, "
                         f"{float(m.max()):g}]: normalise it (e.g. with a mask threshold or ImageToMask)")
    return m if m.ndim == 3 else m[None]


def _unused(name: str, value, used: bool, method: str, hint: str) -> None:
    if value is not None and not used:
        raise ValueError(f"{name} is connected but method {method} does not use it: disconnect it or {hint}")


def build_injection(model, vl=None, *, method: str, node_id=None, negative_vl_embeds=None, reference=None,
                    reference_image=None, vae=None, mask=None, direction=None, reference_seed: int = 0,
                    **settings) -> Injection:
    """Validate everything against the model and return the Injection (raises ValueError with the fix).

    settings: the node's inputs strength … negative_weight (schedule may also be given as schedule_name);
    node_id names the application (its key, injection_key(node_id)): None = the one fixed key of a script.
    """
    chosen = method_named(method)
    traits = chosen.traits
    dit = zimage_diffusion_model(model)
    width = caption_width(dit)
    if "schedule_name" in settings:
        settings["schedule"] = settings.pop("schedule_name")
    validated = InjectionSettings(method=traits, num_blocks=len(dit.layers), **settings)
    steer = method.startswith("steer_")
    refers = method == "reference_attention"
    _unused("vl_embeds", vl, not steer, method, "pick extra_attention / caption_stream / concat / reference_attention")
    _unused("negative_vl_embeds", negative_vl_embeds, traits.attention, method,
            "use extra_attention / reference_attention (a negative subtracts its attention)")
    _unused("reference", reference, refers, method, "use method reference_attention")
    _unused("reference_image", reference_image, refers, method, "use method reference_attention")
    _unused("mask", mask, traits.regional, method, "use extra_attention / reference_attention / steer_image "
            "(the caption is not regional)")
    _unused("direction", direction, steer, method, "use steer_caption / steer_image")
    inputs = {}
    if vl is not None:
        inputs["tokens"], inputs["spans"] = vl_tokens("vl_embeds", vl, width)
    elif method in VL_METHODS:
        raise ValueError(f"method {method} needs vl_embeds: connect a VL Encode / Load VL Embeddings output")
    if negative_vl_embeds is not None:
        if vl is None:
            raise ValueError("negative_vl_embeds needs vl_embeds (a negative pushes away from a positive reference)")
        inputs["negative"] = vl_tokens("negative_vl_embeds", negative_vl_embeds, width)[0]
    if refers:
        if reference is None and reference_image is None:
            raise ValueError("reference_attention needs a reference: connect a LATENT (VAEEncode of the reference "
                             "image) to reference, or an IMAGE to reference_image plus the vae")
        inputs["reference"] = reference_latent(reference, reference_image, vae, dit.in_channels)
        if isinstance(reference_seed, bool) or not isinstance(reference_seed, int) or reference_seed < 0:
            raise ValueError(f"reference_seed must be an integer >= 0, got {reference_seed!r}")
        inputs["reference_seed"] = int(reference_seed)
    if mask is not None:
        inputs["mask"] = region_mask(mask)
    if steer:
        if direction is None:
            raise ValueError(f"{method} needs a direction: connect a VL Steering Direction / Load VL Direction")
        check_direction_for(direction, width)
        require_finite("direction", direction.vector)
        inputs["direction"] = direction.vector.detach().to(device="cpu", dtype=torch.float32)
    return Injection(chosen, validated, InjectionInputs(**inputs), key=injection_key(node_id))


def apply_injection(model, vl=None, *, node_id=None, **settings):
    """model.clone() with the injection installed (the node's execute, usable from scripts and the bench).
    The same node_id replaces an earlier injection; another adds one after those already there. Strength 0
    (or all-zero block weights) installs nothing: the plain model, with this application's earlier hooks gone."""
    injection = build_injection(model, vl, node_id=node_id, **settings)
    patched = model.clone()
    if not injection.settings.acts:
        remove_injection(patched, injection.key)
        log.info("DiT Layer Injection: strength × block weights is 0 everywhere: the model is left unchanged")
        return patched
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
            description="Training-free reference-image conditioning inside chosen Z-Image blocks and steps; chain "
                        "several (each keeps its own hooks). extra_attention: image tokens also attend to the VL "
                        "tokens (IP-Adapter-like, keeps the prompt); reference_attention: they attend to a reference "
                        "latent's own tokens (StyleAligned / reference-only); caption_stream: the caption is pulled "
                        "toward the VL tokens; concat: VL tokens appended to the caption (Redux-like); steer_caption "
                        "/ steer_image: a VL_DIRECTION added inside the blocks. An optional mask limits where it acts.",
            inputs=[
                io.Model.Input("model", tooltip="Z-Image Turbo (UNETLoader → ModelSamplingAuraFlow)."),
                VLEmbedsType.Input("vl_embeds", optional=True,
                                   tooltip="From VL Encode / Load VL Embeddings / Combine References (Qwen3-VL-4B, "
                                           "2560-d). Needed by extra_attention, caption_stream and concat; optional "
                                           "with reference_attention (its VL tokens are attended too). Several "
                                           "references from Combine References (concat) keep their weights."),
                io.Combo.Input("method", options=list(METHODS), default="extra_attention",
                               tooltip="extra_attention: in the chosen blocks image tokens additionally attend to "
                                       "the VL tokens (scaled by strength); reference_attention: they attend to the "
                                       "reference latent's own image tokens (run through the same blocks); "
                                       "caption_stream: after each chosen block the caption tokens move toward the "
                                       "VL tokens embedded like a caption; concat: token_budget VL tokens appended "
                                       "to the caption (strength = log-strength bias on them); steer_caption / "
                                       "steer_image: the direction added to the caption / image tokens."),
                io.Float.Input("strength", default=0.5, min=-2.0, max=4.0, step=0.05,
                               tooltip="Multiplies every block weight: extra / reference attention scale, "
                                       "caption_stream lerp weight (1 = caption replaced), concat and share=joint: "
                                       "attention bias log(strength) (1 = none, must be >= 0), steering step in "
                                       "units of the token's RMS. 0 = the unchanged model."),
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
                             tooltip="extra_attention / concat: VL tokens kept (area-pooled, each reference on its "
                                     "own; 0 = all, ~1 per 32×32 px). Cost grows with it."),
                io.Combo.Input("vl_rope", options=list(VL_ROPE), default="none", advanced=True,
                               tooltip="extra_attention: RoPE of the VL keys. none = position-free set (rotation by "
                                       "position 0, one slot before the caption); caption = positions 1..n like a "
                                       "caption."),
                io.Float.Input("negative_weight", default=1.0, min=0.0, max=4.0, step=0.05, advanced=True, optional=True,
                               tooltip="With negative_vl_embeds: out += w·(attn(reference) − negative_weight·"
                                       "attn(negative)). 1 with a negative equal to the reference cancels it."),
                io.Combo.Input("kv_scale", options=list(KV_SCALES), default="v", advanced=True, optional=True,
                               tooltip="extra / reference attention (share=add): v = scale the added attention "
                                       "(its values); k_and_v = also scale its keys, which sharpens (w > 1) or "
                                       "flattens (w < 1) where the image looks in the reference."),
                io.Combo.Input("share", options=list(SHARES), default="add", optional=True,
                               tooltip="extra / reference attention: add = a separate softmax added with weight "
                                       "(IP-Adapter); joint = one softmax over the block's own keys and the "
                                       "reference's, the reference biased by log(strength) (StyleAligned shared "
                                       "attention; costs one more own-size attention per block)."),
                io.Combo.Input("reference_noise", options=list(REFERENCE_NOISE), default="matched", optional=True,
                               tooltip="reference_attention: matched = the reference noised to each step's sigma "
                                       "(fixed seed) and run alongside, only as deep as the deepest chosen block; "
                                       "clean = the clean reference, its keys/values computed once per run "
                                       "(cheaper; holds them in VRAM for the run)."),
                io.Boolean.Input("reference_adain", default=False, advanced=True, optional=True,
                                 tooltip="reference_attention: AdaIN of the image queries (and, with share=joint, "
                                         "keys) toward the reference's statistics per channel (StyleAligned)."),
                io.Int.Input("reference_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, advanced=True, optional=True,
                             control_after_generate=False,
                             tooltip="reference_noise=matched: the seed of the reference's fixed noise."),
                VLEmbedsType.Input("negative_vl_embeds", optional=True,
                                   tooltip="extra / reference attention: a VL reference to push away from (its "
                                           "attention is subtracted, × negative_weight)."),
                io.Latent.Input("reference", optional=True,
                                tooltip="reference_attention: the reference image as a LATENT (VAEEncode with "
                                        "Z-Image's VAE); resized to the output latent if its size differs."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="reference_attention: the reference as an IMAGE, encoded with vae (instead "
                                       "of reference)."),
                io.Vae.Input("vae", optional=True, tooltip="Z-Image's VAE, to encode reference_image."),
                io.Mask.Input("mask", optional=True,
                              tooltip="extra / reference attention, steer_image: where it acts (resized to the "
                                      "latent's token grid; 0 = untouched, 1 = full, in between = weighted). Chain "
                                      "two injections with complementary masks for two references in two regions."),
                VLDirectionType.Input("direction", optional=True,
                                      tooltip="steer_caption / steer_image: a VL_DIRECTION (VL Steering Direction / "
                                              "Load VL Direction / Combine Directions)."),
            ],  # every input after vl_rope is optional: API prompts saved before they existed keep validating
            outputs=[io.Model.Output()],
            hidden=[io.Hidden.unique_id],  # this application's key: chained injections each keep their own
        )

    @classmethod
    def execute(cls, model, method: str, strength: float, block_weights: str, caption_mode: str,
                start_percent: float, end_percent: float, schedule: str, apply_to: str, token_budget: int,
                vl_rope: str, negative_weight: float = 1.0, kv_scale: str = "v", share: str = "add",
                reference_noise: str = "matched", reference_adain: bool = False, reference_seed: int = 0,
                vl_embeds=None, negative_vl_embeds=None, reference=None, reference_image=None, vae=None, mask=None,
                direction=None) -> io.NodeOutput:
        hidden = getattr(cls, "hidden", None)
        patched = apply_injection(model, vl_embeds, node_id=getattr(hidden, "unique_id", None), method=method,
                                  strength=strength, block_weights=block_weights, caption_mode=caption_mode,
                                  start_percent=start_percent, end_percent=end_percent, schedule=schedule,
                                  apply_to=apply_to, token_budget=token_budget, vl_rope=vl_rope,
                                  negative_weight=negative_weight, kv_scale=kv_scale, share=share,
                                  reference_noise=reference_noise, reference_adain=reference_adain,
                                  reference_seed=reference_seed, negative_vl_embeds=negative_vl_embeds,
                                  reference=reference, reference_image=reference_image, vae=vae, mask=mask,
                                  direction=direction)
        return io.NodeOutput(patched)
