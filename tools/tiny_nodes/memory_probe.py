"""TEST-ONLY observer node: which models ComfyUI holds loaded before and during sampling.

TinyMemoryProbe takes a MODEL and returns a clone carrying two wrappers:
  - PREPARE_SAMPLING: records ``comfy.model_management.current_loaded_models`` just before the sampler
    loads its models ("before_load": every encode has run by then) and right after ("after_load");
  - APPLY_MODEL: records them at the first denoising step ("step"), and counts the steps.
Each record lists the loaded models as {"kind", "class", "device", "loaded_bytes"}; "kind" is one of
"qwen3vl" (the VL model, native or transformers), "text_encoder", "diffusion_model", "vae", "other".
The records go to ``<output directory>/<filename>`` as JSON, rewritten after every event.

Registers itself in the tiny nodes package's mappings when the package imports it.
"""

from __future__ import annotations

import json
import os
import sys

import comfy.model_management
import comfy.patcher_extension
import folder_paths

KEY = "zimage_vl_memory_probe"


def _kind(patcher) -> str:
    model = getattr(patcher, "model", None)
    names = [c.__name__ for c in type(model).__mro__] if model is not None else []
    if any(n.startswith("Qwen3VL") for n in names) or "_PatcherHost" in names:
        return "qwen3vl"
    if getattr(patcher, "is_clip", False):
        return "text_encoder"
    if hasattr(model, "diffusion_model"):
        return "diffusion_model"
    if any("Autoencod" in n or "VAE" in n for n in names):
        return "vae"
    return "other"


def loaded_models_snapshot() -> list[dict]:
    out = []
    for lm in comfy.model_management.current_loaded_models:
        patcher = lm.model
        if patcher is None:
            continue
        try:
            loaded = int(patcher.loaded_size())
        except Exception:  # noqa: BLE001 - observer only
            loaded = -1
        out.append({"kind": _kind(patcher), "class": type(patcher.model).__name__, "device": str(lm.device),
                    "loaded_bytes": loaded})
    return out


class _Recorder:
    def __init__(self, path: str):
        self.path = path
        self.data = {"before_load": None, "after_load": None, "step": None, "steps": 0}

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)

    def prepare_sampling(self, executor, *args, **kwargs):
        self.data["before_load"] = loaded_models_snapshot()
        out = executor(*args, **kwargs)
        self.data["after_load"] = loaded_models_snapshot()
        self.save()
        return out

    def apply_model(self, executor, *args, **kwargs):
        if self.data["step"] is None:
            self.data["step"] = loaded_models_snapshot()
        self.data["steps"] += 1
        self.save()
        return executor(*args, **kwargs)


class TinyMemoryProbe:
    CATEGORY = "testing/zimage_vl_tiny"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "probe"
    DESCRIPTION = ("TEST ONLY: records which models ComfyUI holds loaded before and during sampling "
                   "(JSON in the output directory).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model on its way to the sampler."}),
            "filename": ("STRING", {"default": "memory_probe.json",
                                    "tooltip": "File name (in the output directory) the records go to."}),
        }}

    def probe(self, model, filename):
        name = os.path.basename(filename)
        if not name or name != filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        rec = _Recorder(os.path.join(folder_paths.get_output_directory(), name))
        rec.save()
        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, KEY, rec.prepare_sampling)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, rec.apply_model)
        return (m,)


_package = sys.modules.get(__package__) if __package__ else None
if _package is not None and hasattr(_package, "NODE_CLASS_MAPPINGS"):
    _package.NODE_CLASS_MAPPINGS["TinyMemoryProbe"] = TinyMemoryProbe
    _package.NODE_DISPLAY_NAME_MAPPINGS["TinyMemoryProbe"] = "Tiny memory probe (TEST)"
