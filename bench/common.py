"""Shared by the bench scripts: find and import the ComfyUI host (stubbing what a GPU box lacks), import this
pack's modules, Z-Image's real DiT config and ComfyUI's native Qwen3-VL CLIP target."""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PKG = "zimage_vl_bench_pack"

# Z-Image Turbo's DiT as ComfyUI detects it (comfy/model_detection.py, lumina2 with dim 3840): 6.15B parameters.
ZIMAGE_CONFIG = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
          "n_layers": 30, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
          "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
          "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}

def find_comfy(explicit: str | None) -> Path:
    for cand in (explicit, os.environ.get("COMFYUI_PATH"), REPO_ROOT / ".comfy_host", Path.home() / "ComfyUI"):
        if cand and (Path(cand) / "comfy" / "model_patcher.py").is_file():
            return Path(cand)
    sys.exit("no ComfyUI found: pass --comfy, set COMFYUI_PATH or copy the host into ./.comfy_host")


def stub_missing_av() -> None:
    """PyAV is only needed by ComfyUI's video types; a permissive stub lets comfy_api import without it."""
    try:
        import av  # noqa: F401
    except ImportError:
        class _Meta(type):
            def __getattr__(cls, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return cls

        class _Any(metaclass=_Meta):
            def __init__(self, *a, **k):
                pass

            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return _Any

            def __call__(self, *a, **k):
                return _Any()

        def _getattr(name):
            if name.startswith("__"):      # module dunders (__file__, __path__, ...): inspect walks sys.modules
                raise AttributeError(name)
            return _Any

        for name in ("av", "av.container", "av.video", "av.video.frame", "av.video.reformatter", "av.audio",
                     "av.audio.frame", "av.subtitles", "av.subtitles.stream", "av.logging"):
            mod = types.ModuleType(name)
            mod.__getattr__ = _getattr
            mod.__version__ = "0.0.0-stub"
            sys.modules[name] = mod


def stub_missing_kitchen() -> None:
    """comfy-kitchen (fp8/fp4 kernels, a 40 MB wheel) is optional in ComfyUI except for one unconditional
    import (comfy/ldm/joyimage/model.py); an empty module satisfies it, and quant_ops then reports it absent."""
    try:
        import comfy_kitchen  # noqa: F401
    except ImportError:
        sys.modules["comfy_kitchen"] = types.ModuleType("comfy_kitchen")


def import_host(comfy_root: Path, cpu: bool, reserve_vram_gb: float | None = None):
    if str(comfy_root) not in sys.path:
        sys.path.append(str(comfy_root))
    stub_missing_av()
    stub_missing_kitchen()
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.disable_dynamic_vram = True   # the legacy ModelPatcher, as without comfy-aimdo's init
    if reserve_vram_gb is not None:
        comfy.cli_args.args.reserve_vram = reserve_vram_gb
    import comfy.model_management  # noqa: F401


def import_pack(module: str, bare: tuple[str, ...] = ()):
    """Import <repo>/<module> with the repo root as package PKG (the nodes use relative imports).

    Sub-packages named in `bare` get an empty package module, so their __init__ (which imports every
    node and backend) does not run."""
    for name, path in ((PKG, REPO_ROOT), *((f"{PKG}.{b}", REPO_ROOT / b) for b in bare)):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    return importlib.import_module(f"{PKG}.{module}")


def native_qwen3vl_target(model_type: str, width: int, dtype):
    """A CLIP target for ComfyUI's native Qwen3-VL of `model_type` whose tokenizer embeds at `width`."""
    import comfy.text_encoders.qwen3vl as qwen3vl

    base_tokenizer = qwen3vl.tokenizer(model_type=model_type)

    class Tokenizer(base_tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
            getattr(self, self.clip).embedding_size = width

    return types.SimpleNamespace(params={}, clip=qwen3vl.te(dtype_llama=dtype, model_type=model_type),
                                 tokenizer=Tokenizer)
