"""TEST-ONLY ComfyUI nodes that build tiny, deterministic models from ComfyUI's own classes.

Never shipped with the pack: the host test fixture links this folder into a temporary
``custom_nodes`` directory as ``zimage_vl_tiny_nodes``.  Every model here is the real ComfyUI
architecture (Z-Image NextDiT, Z-Image Qwen3-4B text encoder, native Qwen3-VL, Flux-style VAE)
shrunk to a width that runs on a CPU in well under a second, with weights drawn from a seeded
generator so that two builds with the same seed are bit-identical.

Nodes:
  TinyZImageModel       -> MODEL  (comfy.supported_models.ZImage, dim 256, 2 layers)
  TinyLumina2Model      -> MODEL  (comfy.supported_models.Lumina2, the same NextDiT shape: not Z-Image)
  TinyZImageTextEncoder -> CLIP   (ZImageTokenizer + Qwen3_4BModel, hidden 256, 4 layers)
  TinyQwen3VLClip       -> CLIP   (tools/tiny_models.make_native_tiny_qwen3vl_clip)
  TinyVAE               -> VAE    (comfy.sd.VAE from a tiny 16-channel Flux-layout state dict)
"""

from __future__ import annotations

import math
import os
import sys

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.z_image

_HERE = os.path.dirname(os.path.realpath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(_HERE))

CATEGORY = "testing/zimage_vl_tiny"

# The config ComfyUI's model_detection.detect_unet_config returns for Z-Image Turbo
# (lumina2 branch, dim 3840, with cap_pad_token present), shrunk to a CPU-sized model.
REAL_ZIMAGE_UNET_CONFIG = {
    "image_model": "lumina2",
    "patch_size": 2,
    "in_channels": 16,
    "dim": 3840,
    "cap_feat_dim": 2560,
    "n_layers": 30,
    "qk_norm": True,
    "n_heads": 30,
    "n_kv_heads": 30,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "rope_theta": 256.0,
    "ffn_dim_multiplier": 8.0 / 3.0,
    "z_image_modulation": True,
    "time_scale": 1000.0,
    "pad_tokens_multiple": 32,
}

TINY_QWEN3_TE_CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,   # head_dim stays 128 (Qwen3_4BConfig), 2 x 128 = 256
    "num_key_value_heads": 1,
}


def tiny_zimage_unet_config(cap_feat_dim: int = 256) -> dict:
    cfg = dict(REAL_ZIMAGE_UNET_CONFIG)
    cfg.update(dim=256, n_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=int(cap_feat_dim),
               axes_dims=[32, 48, 48])
    return cfg


def _is_norm_weight(name: str, shape: tuple) -> bool:
    # every 1-D ``weight`` in these architectures is a norm scale (RMSNorm/LayerNorm/GroupNorm)
    return len(shape) == 1 and name.endswith(".weight")


@torch.no_grad()
def deterministic_fill_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter of ``module`` from a seeded CPU generator (order: sorted names).

    Matrices/convolutions: N(0, gain/sqrt(fan_in)); norm scales: 1 + N(0, 0.05);
    other vectors (biases, pad tokens): N(0, 0.02).  Values are drawn in float32 and cast, so
    the result does not depend on the storage dtype's random kernels.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    params = dict(module.named_parameters())
    for name in sorted(params):
        p = params[name]
        shape = tuple(p.shape)
        if len(shape) >= 2 and "pad_token" not in name:
            fan_in = max(1, p.numel() // shape[0])
            std = gain / math.sqrt(fan_in)
            if "embed_tokens" in name:
                std = 1.0
            vals = torch.randn(shape, generator=gen, dtype=torch.float32) * std
        elif _is_norm_weight(name, shape):
            vals = 1.0 + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float32)
        elif "pad_token" in name:
            vals = torch.randn(shape, generator=gen, dtype=torch.float32)
        else:
            vals = 0.02 * torch.randn(shape, generator=gen, dtype=torch.float32)
        if p.device.type == "meta":
            raise RuntimeError(f"parameter {name} is on the meta device")
        p.data.copy_(vals.to(device=p.device, dtype=p.dtype))
    return module


# --------------------------------------------------------------------------- builders

def build_tiny_zimage_model(seed: int = 0, cap_feat_dim: int = 256, config_class=comfy.supported_models.ZImage):
    unet_config = tiny_zimage_unet_config(cap_feat_dim)
    if config_class is comfy.supported_models.Lumina2:  # the same NextDiT without Z-Image's own settings
        for key in ("z_image_modulation", "time_scale", "pad_tokens_multiple"):
            unet_config.pop(key)
    model_config = config_class(unet_config)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    dtype = torch.float32
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model({})
    deterministic_fill_(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def build_tiny_zimage_text_encoder(seed: int = 0, hidden_size: int = 256):
    te_cfg = dict(TINY_QWEN3_TE_CONFIG)
    te_cfg["hidden_size"] = int(hidden_size)
    te_cfg["num_attention_heads"] = max(1, int(hidden_size) // 128)
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.z_image.ZImageTokenizer,
                                                    comfy.text_encoders.z_image.te())
    model_options = {"qwen3_4b_model_config": te_cfg,
                     "load_device": torch.device("cpu"), "offload_device": torch.device("cpu")}
    clip = comfy.sd.CLIP(target=target, model_options=model_options, disable_dynamic=True)
    deterministic_fill_(clip.cond_stage_model, seed)
    return clip


def _tiny_models_module():
    """tools/tiny_models.py loaded by path (ComfyUI has its own ``tests`` package on sys.path)."""
    import importlib.util
    name = "zimage_vl_tests_tiny_models"
    if name in sys.modules:
        return sys.modules[name]
    if REPO_ROOT not in sys.path:
        sys.path.append(REPO_ROOT)  # for the repo's own packages (vl_core); appended, never shadowing ComfyUI
    path = os.path.join(REPO_ROOT, "tools", "tiny_models.py")
    if not os.path.isfile(path):
        raise RuntimeError(f"tools/tiny_models.py not found under {REPO_ROOT}: the tiny Qwen3-VL builders are missing")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    return module


# 8 decoder layers so the shipped default layer -6 is valid and exercised as is.
TINY_VL_LAYERS = 8


def build_tiny_qwen3vl_clip(seed: int = 0, hidden_size: int = 256, hf_path: str | None = None):
    return _tiny_models_module().make_native_tiny_qwen3vl_clip(hf_path=hf_path, hidden_size=int(hidden_size), seed=int(seed),
                                                                      num_layers=TINY_VL_LAYERS)


def tiny_vae_state_dict(seed: int = 0, decoder_ch: int = 32) -> dict:
    """State dict in the Flux ``ae.safetensors`` layout (no quant convs, 16 latent channels).

    ComfyUI's VAE detection hard-codes the encoder width (ch 128, ch_mult [1,2,4,4], 2 res
    blocks) but reads the decoder width from ``decoder.conv_in.weight`` (ch = out/4), so the
    smallest accepted model keeps the stock encoder and shrinks the decoder to ch=32
    (GroupNorm(32) forbids fewer channels).
    """
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    dec = dict(ddconfig, ch=int(decoder_ch))
    model = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dec})
    model.to(torch.float32)
    deterministic_fill_(model, seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_tiny_vae(seed: int = 0):
    sd = tiny_vae_state_dict(seed)
    vae = comfy.sd.VAE(sd=sd)
    if vae.latent_channels != 16:
        raise RuntimeError(f"tiny VAE detected with {vae.latent_channels} latent channels, expected 16")
    return vae


# --------------------------------------------------------------------------- nodes

_SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the deterministic weight fill."})


class TinyZImageModel:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    DESCRIPTION = "TEST ONLY: tiny Z-Image NextDiT (dim 256, 2 layers) with seeded random weights."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": _SEED,
            "cap_feat_dim": ("INT", {"default": 256, "min": 16, "max": 8192, "step": 16,
                                     "tooltip": "Caption feature width (text-encoder hidden size)."}),
        }}

    def build(self, seed, cap_feat_dim):
        return (build_tiny_zimage_model(seed, cap_feat_dim),)


class TinyLumina2Model(TinyZImageModel):
    DESCRIPTION = "TEST ONLY: tiny Lumina 2 NextDiT (the Z-Image class and widths, not Z-Image), for refusals."

    def build(self, seed, cap_feat_dim):
        return (build_tiny_zimage_model(seed, cap_feat_dim, comfy.supported_models.Lumina2),)


class TinyZImageTextEncoder:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    DESCRIPTION = "TEST ONLY: ComfyUI's Z-Image Qwen3-4B text encoder shrunk to hidden 256, 4 layers."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": _SEED,
            "hidden_size": ("INT", {"default": 256, "min": 128, "max": 4096, "step": 128,
                                    "tooltip": "Hidden width (multiple of the 128 head dim)."}),
        }}

    def build(self, seed, hidden_size):
        return (build_tiny_zimage_text_encoder(seed, hidden_size),)


class TinyQwen3VLClip:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "build"
    DESCRIPTION = "TEST ONLY: tiny native (comfy.text_encoders.qwen3vl) Qwen3-VL CLIP."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": _SEED,
            "hidden_size": ("INT", {"default": 256, "min": 64, "max": 4096, "step": 64,
                                    "tooltip": "Language-model hidden width (use 384 to provoke a width mismatch)."}),
        }}

    def build(self, seed, hidden_size):
        return (build_tiny_qwen3vl_clip(seed, hidden_size),)


class TinyVAE:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"
    DESCRIPTION = "TEST ONLY: 16-channel Flux-layout VAE with a ch=32 decoder and seeded random weights."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED}}

    def build(self, seed):
        return (build_tiny_vae(seed),)


NODE_CLASS_MAPPINGS = {
    "TinyZImageModel": TinyZImageModel,
    "TinyLumina2Model": TinyLumina2Model,
    "TinyZImageTextEncoder": TinyZImageTextEncoder,
    "TinyQwen3VLClip": TinyQwen3VLClip,
    "TinyVAE": TinyVAE,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TinyZImageModel": "Tiny Z-Image model (TEST)",
    "TinyLumina2Model": "Tiny Lumina 2 model (TEST)",
    "TinyZImageTextEncoder": "Tiny Z-Image text encoder (TEST)",
    "TinyQwen3VLClip": "Tiny Qwen3-VL CLIP (TEST)",
    "TinyVAE": "Tiny 16ch VAE (TEST)",
}

from . import memory_probe  # noqa: E402,F401  (test-only observer; registers TinyMemoryProbe above)
from . import tiny_clip  # noqa: E402,F401  (test-only CLIP vision / text models; registers themselves)
