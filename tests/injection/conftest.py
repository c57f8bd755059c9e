"""In-process tests of the DiT Layer Injection on ComfyUI's own classes (no server).

The host comes from ``COMFYUI_PATH`` (default ``$HOME/ComfyUI``); it is appended to sys.path and
forced onto the CPU before anything of comfy is imported. Without a host every test here is
skipped and one loud line says so.

Builders: a tiny Z-Image (``comfy.supported_models.ZImage`` with the real Z-Image Turbo config from
``comfy/model_detection.py``'s lumina2 branch for dim 3840, shrunk to dim 256, 4 layers, 2 heads,
axes [32, 48, 48], cap_feat_dim 256) with seeded random weights, wrapped in a real ModelPatcher,
and VLEmbeds of the matching width. Sampling goes through ``comfy.sample.sample`` (what
``nodes.common_ksampler`` calls).

The pack is imported under the package name ``zimage_vl_pack`` without running ``nodes/__init__.py``
(which registers every node family): only ``nodes/common.py`` and ``nodes/injection.py`` load.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import types
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
PKG = "zimage_vl_pack"

ZIMAGE_TURBO_UNET_CONFIG = {  # comfy/model_detection.py, lumina2 branch, dim 3840, cap_pad_token present
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
    "n_layers": 30, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
    "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
}
TINY = dict(dim=256, n_layers=4, n_heads=2, n_kv_heads=2, cap_feat_dim=256, axes_dims=[32, 48, 48])


def _comfyui_path() -> Path | None:
    env = os.environ.get("COMFYUI_PATH")
    p = Path(env).expanduser() if env else Path.home() / "ComfyUI"
    return p if (p / "comfy" / "model_patcher.py").is_file() else None


COMFY_ROOT = _comfyui_path()
SKIP_REASON = None if COMFY_ROOT is not None else (
    f"no ComfyUI host (COMFYUI_PATH={os.environ.get('COMFYUI_PATH')!r}, $HOME/ComfyUI missing): "
    "tests/injection SKIPPED — the DiT Layer Injection was NOT tested against ComfyUI's classes")


def pytest_collection_modifyitems(config, items):
    if SKIP_REASON is None:
        return
    marker = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(HERE):
            item.add_marker(marker)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if SKIP_REASON is not None:
        terminalreporter.write_line("!!! " + SKIP_REASON + " !!!", red=True, bold=True)


# --------------------------------------------------------------------------- host + pack import

def _import_host():
    root = str(COMFY_ROOT)
    if root not in sys.path:
        sys.path.append(root)  # appended: the repo's own packages keep precedence for the pack import
    import comfy.options

    comfy.options.enable_args_parsing(False)  # comfy.cli_args then parses [] instead of pytest's argv
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # read by comfy.model_management at its import
    import comfy.model_management

    if comfy.model_management.get_torch_device().type != "cpu":
        raise RuntimeError("comfy.model_management was imported before the CPU was forced")


def _import_pack():
    """nodes/injection.py (and what it imports) as zimage_vl_pack.*, without nodes/__init__.py."""
    if PKG + ".nodes.injection" in sys.modules:
        return sys.modules[PKG + ".nodes.injection"]
    for name, path in ((PKG, REPO_ROOT), (PKG + ".nodes", REPO_ROOT / "nodes")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            mod.__package__ = name
            sys.modules[name] = mod
    return importlib.import_module(PKG + ".nodes.injection")


class Host(types.SimpleNamespace):
    """Modules and builders the tests use (one per session)."""


@pytest.fixture(scope="session")
def host():
    if COMFY_ROOT is None:
        pytest.skip(SKIP_REASON)
    _import_host()
    import torch
    import comfy.ldm.lumina.model
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models  # noqa: F401  (the modules the tests reach through host.comfy)

    injection = _import_pack()
    types_mod = importlib.import_module(PKG + ".vl_core.types")
    return Host(torch=torch, comfy=sys.modules["comfy"], injection=injection, VLEmbeds=types_mod.VLEmbeds,
                make_model=make_model, make_vl=make_vl, make_cond=make_cond, sample=sample,
                patches_of=patches_of, CallRecorder=CallRecorder, BlockRecorder=BlockRecorder,
                DoubleBlockObserver=DoubleBlockObserver, flux_model=flux_model, lumina2_model=lumina2_model,
                without_injection=without_injection)


# --------------------------------------------------------------------------- builders

def tiny_unet_config(**overrides) -> dict:
    cfg = dict(ZIMAGE_TURBO_UNET_CONFIG)
    cfg.update(TINY)
    cfg.update(overrides)
    return cfg


def deterministic_fill_(module, seed: int):
    """Seeded weights, sorted-name order: matrices N(0, 1/fan_in), norm scales 1 + N(0, 0.05), pad tokens N(0, 1),
    other vectors N(0, 0.02)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            shape = tuple(p.shape)
            if "pad_token" in name:
                vals = torch.randn(shape, generator=gen)
            elif len(shape) >= 2:
                vals = torch.randn(shape, generator=gen) / math.sqrt(max(1, p.numel() // shape[0]))
            elif name.endswith(".weight"):
                vals = 1.0 + 0.05 * torch.randn(shape, generator=gen)
            else:
                vals = 0.02 * torch.randn(shape, generator=gen)
            p.copy_(vals.to(p.dtype))
    return module


def make_model(seed: int = 0, **overrides):
    """A real ModelPatcher over comfy.supported_models.ZImage(tiny config).get_model({}) on the CPU, float32."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.ZImage(tiny_unet_config(**overrides))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    deterministic_fill_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def make_vl(width: int = 256, tokens: int = 40, seed: int = 1, batch: int = 1, scale: float = 1.0):
    import torch

    types_mod = importlib.import_module(PKG + ".vl_core.types")
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, width, generator=g) * scale
    return types_mod.VLEmbeds(hidden={30: hidden}, image_spans=((2, tokens - 4),), prompt_span=(tokens - 4, tokens - 1),
                              num_layers=36, source="test")


def make_cond(tokens: int = 20, width: int = 256, seed: int = 2, zero: bool = False):
    import torch

    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(1, tokens, width) if zero else torch.randn(1, tokens, width, generator=g)
    return [[t, {}]]


def sample(model, *, steps: int = 4, cfg: float = 1.0, size: int = 64, seed: int = 0, positive=None, negative=None,
           sampler: str = "euler", scheduler: str = "simple", callback=None, sigmas=None):
    """comfy.sample.sample on a [1, 16, size, size] empty latent, as nodes.common_ksampler does."""
    import torch
    import comfy.sample

    latent = torch.zeros(1, 16, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    positive = positive if positive is not None else make_cond()
    negative = negative if negative is not None else make_cond(seed=3)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                   seed=seed, callback=callback, disable_pbar=True,
                                   sigmas=None if sigmas is None else torch.tensor(sigmas, dtype=torch.float32))


def patches_of(model, name: str) -> list:
    return list(model.model_options.get("transformer_options", {}).get("patches", {}).get(name, []))


# --------------------------------------------------------------------------- instrumentation

def without_injection(transformer_options: dict) -> dict:
    """A copy of transformer_options with every injection's wrapper, patches and per-call state removed."""
    injection = sys.modules[PKG + ".nodes.injection"]
    to = dict(transformer_options)
    to.pop(injection.STATE_KEY, None)
    if "wrappers" in to:
        to["wrappers"] = {kind: {key: list(fns) for key, fns in by_key.items()
                                 if not str(key).startswith(injection.PATCH_KEY)}
                          for kind, by_key in to["wrappers"].items()}
    if "patches" in to:
        to["patches"] = {name: [p for p in ps if getattr(p, "zimage_vl_key", None) is None]
                         for name, ps in to["patches"].items()}
    return to


class CallRecorder:
    """A model_function_wrapper that, for every model call, also runs the same call without this pack's hooks.

    calls: list of dicts {sigma, cond_or_uncond, out, ref} (out/ref [B, C, H, W]).
    Install on the INPUT model before applying the node (the clone inherits it).
    """

    def __init__(self):
        self.calls = []

    def __call__(self, apply_model, args):
        c = args["c"]
        out = apply_model(args["input"], args["timestep"], **c)
        c_ref = dict(c)
        c_ref["transformer_options"] = without_injection(c["transformer_options"])
        ref = apply_model(args["input"], args["timestep"], **c_ref)
        self.calls.append({"sigma": float(args["timestep"].reshape(-1)[0]), "cond_or_uncond": list(args["cond_or_uncond"]),
                           "out": out.detach().clone(), "ref": ref.detach().clone(),
                           "input": args["input"].detach().clone()})
        return out

    def chunks(self, call, key):
        n = len(call["cond_or_uncond"])
        return dict(zip(call["cond_or_uncond"], call[key].chunk(n)))


class BlockRecorder:
    """Forward pre/post hooks on every main layer of a NextDiT: per call, per block, the input (x, freqs, vec,
    options) and output. Use as a context manager (hooks removed on exit; the module is shared by clones)."""

    def __init__(self, dit):
        self.dit = dit
        self.records = []  # list of {block: {"x", "freqs", "vec", "out"}} per model call
        self.handles = []

    def __enter__(self):
        for j, layer in enumerate(self.dit.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(j), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post(j)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, j):
        def hook(module, args, kwargs):
            if j == 0:
                self.records.append({})
            x, mask, freqs, vec = args[:4]
            self.records[-1][j] = {"x": x.detach().clone(), "mask": mask, "freqs": freqs, "vec": vec.detach().clone(),
                                   "options": kwargs.get("transformer_options")}
        return hook

    def _post(self, j):
        def hook(module, args, output):
            self.records[-1][j]["out"] = output.detach().clone()
        return hook


class DoubleBlockObserver:
    """A double_block patch that copies (img, txt) of every block of every call; returns {} (changes nothing)."""

    def __init__(self):
        self.calls = []

    def __call__(self, args):
        i = args["block_index"]
        if i == 0:
            self.calls.append({})
        self.calls[-1][i] = (args["img"].detach().clone(), args["txt"].detach().clone())
        return {}


def flux_model():
    """A tiny ComfyUI Flux (not Z-Image) ModelPatcher, for the refusal test."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64, "context_in_dim": 64,
           "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
           "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": False, "patch_size": 2,
           "txt_ids_dims": []}
    mc = comfy.supported_models.Flux(cfg)
    mc.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(mc.get_model({}), load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def lumina2_model():
    """A tiny ComfyUI Lumina 2 (same NextDiT class and widths as the tiny Z-Image, not Z-Image), for the refusal
    test: comfy.supported_models.Lumina2 with the lumina2 detection branch's keys, no Z-Image modulation."""
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 256,
           "n_layers": 2, "qk_norm": True, "n_heads": 2, "n_kv_heads": 1, "axes_dims": [32, 48, 48],
           "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}
    mc = comfy.supported_models.Lumina2(cfg)
    mc.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(mc.get_model({}), load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


@pytest.fixture(scope="module")
def base(host):
    """The tiny Z-Image model most injection tests patch."""
    return host.make_model(seed=0)


@pytest.fixture(scope="module")
def vl(host):
    """40 VL tokens to inject."""
    return host.make_vl(tokens=40, seed=1)
