"""Unload one model from the GPU through ComfyUI model management (both VL backends' `offload()`)."""
from __future__ import annotations

import comfy.model_management as model_management


def offload_patcher(patcher) -> bool:
    """Unload this ModelPatcher (and its clones) from the devices ComfyUI loaded it to, keeping every other
    loaded model; True if it was loaded. Weights go back to the patcher's offload device."""
    loaded = model_management.current_loaded_models
    base = patcher.clone_base_uuid
    mine = [m for m in loaded if m.model is not None and m.model.clone_base_uuid == base]
    if not mine:
        return False
    keep = [m for m in loaded if not any(m is x for x in mine)]
    for device in {m.device for m in mine}:
        model_management.free_memory(1e30, device, keep_loaded=keep)
    return True
