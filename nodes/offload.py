"""Load / unload one model through ComfyUI model management (both VL backends).

`ensure_loaded` skips `load_models_gpu` when the model is already fully resident, unchanged and there is room
for the encode's activations: in ComfyUI 0.29 a call on a loaded model still detaches, re-patches and re-hooks
it (≈ 2.5–2.9 ms of host time per encode on an H200 machine, bench/README.md "VL encode"). What the skip leaves
out: moving the model to the front of ComfyUI's loaded list (a tie-break in its unload order).
"""
from __future__ import annotations

import comfy.model_management as model_management
import torch


def residency(patcher) -> tuple | None:
    """A token that changes whenever ComfyUI (re)loads, partially unloads, moves or re-patches this model's
    weights; None where the model is not fully resident on its load device unchanged (then load it)."""
    return None if _resident_entry(patcher) is None else _token(patcher)


def _token(patcher) -> tuple:
    model = patcher.model
    return (id(model), patcher.patches_uuid, model.model_loaded_weight_memory, str(patcher.load_device))


def _resident_entry(patcher):
    """ComfyUI's LoadedModel record of this very patcher where its model is fully resident on its load device
    with its own patches in place, else None."""
    model = getattr(patcher, "model", None)
    if model is None or patcher.is_dynamic() or getattr(patcher, "forced_hooks", None) is not None:
        return None
    if model_management.DISABLE_SMART_MEMORY:     # there, every load also unloads the device's other models
        return None
    # another clone's object patches / injections still in the (shared) module: loading puts ours back
    if set(getattr(patcher, "object_patches_backup", {})) != set(getattr(patcher, "object_patches", {})):
        return None
    if getattr(patcher, "injections", None) and not getattr(patcher, "is_injected", False):
        return None
    if patcher.model_patches_models() or getattr(model, "model_lowvram", True):
        return None
    if getattr(model, "model_loaded_weight_memory", 0) <= 0:
        return None
    if getattr(model, "current_weight_patches_uuid", None) != patcher.patches_uuid:
        return None
    if patcher.current_loaded_device() != patcher.load_device:
        return None
    return next((m for m in model_management.current_loaded_models if m.model is patcher), None)


def ensure_loaded(patcher, memory_required: int = 0, force_full_load: bool = False) -> tuple | None:
    """load_models_gpu([patcher], ...) unless the model is resident (residency() is not None) and the device
    has the free memory that call would make room for; returns the residency token afterwards."""
    entry = _resident_entry(patcher)
    if entry is not None:
        device = patcher.load_device
        needed = max(model_management.minimum_inference_memory(),
                     memory_required + model_management.extra_reserved_memory())
        if model_management.is_device_cpu(device) or _free_memory_at_least(device, needed):
            entry.currently_used = True     # as load_models_gpu marks it
            return _token(patcher)
    model_management.load_models_gpu([patcher], memory_required=memory_required, force_full_load=force_full_load)
    return residency(patcher)


def _free_memory_at_least(device, needed: int) -> bool:
    """get_free_memory(device) >= needed. On CUDA the driver's free bytes alone (a lower bound of it: ComfyUI adds
    torch's reserved-but-unused bytes) answer most calls in microseconds; its torch.cuda.memory_stats costs ≈ 0.2 ms."""
    if getattr(device, "type", None) == "cuda" and torch.cuda.mem_get_info(device)[0] >= needed:
        return True
    return model_management.get_free_memory(device) >= needed


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
