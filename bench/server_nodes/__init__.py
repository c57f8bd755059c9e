"""BENCH-ONLY ComfyUI custom nodes for bench/bench_server.py (never shipped, never loaded by the tests).

Loader nodes that stand in for the shipped workflow's UNETLoader / CLIPLoader / VAELoader with full-size
random-init models of the real architectures, built by bench_workflow.py's builders (host_loader=True: weights
left in host memory and the patcher class the server chose, as ComfyUI's own loaders leave them):

  BenchZImageModel        -> MODEL  Z-Image Turbo DiT (comfy.supported_models.ZImage, 6.15B; size "tiny": dim 256)
  BenchZImageTextEncoder  -> CLIP   Z-Image's Qwen3-4B text encoder
  BenchQwen3VLClip        -> CLIP   ComfyUI's native Qwen3-VL-4B
  BenchVAE                -> VAE    the 16-channel Flux VAE
  BenchLoadImage          -> IMAGE, MASK  LoadImage's output read with PIL (ComfyUI 0.29's LoadImage opens every
                             file with PyAV, which the GPU machine lacks; bench_server.py swaps it in only then)

and a recorder around ComfyUI's per-node executor (execution.execute), active only for prompts whose
extra_data carries "zimage_vl_bench": {"file": NAME, "unload_first": bool, "isolate": bool}. For every node of
such a prompt it writes to <output directory>/NAME: wall time, torch.cuda peak allocated / reserved (stats reset
at the node's start), the device's peak used memory (total - free from cudaMemGetInfo, sampled every 2 ms by a
thread: it also sees memory outside torch's allocator, e.g. comfy-aimdo's dynamic-VRAM weights) and the models
ComfyUI holds loaded after the node. "unload_first" unloads every model before the prompt's first node (a cold
run); "isolate" does so before every node that executes (each stage's own requirement, its model load included).
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import sys
import threading
import time

import torch

import comfy.model_management as mm
import comfy.model_patcher
import execution
import folder_paths

EXTRA_KEY = "zimage_vl_bench"
BENCH_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
CATEGORY = "testing/zimage_vl_bench"
_SIZE = (["full", "tiny"], {"default": "full", "tooltip": "full: the real architecture; tiny: a CPU-sized one."})
_bw = None


def bench_workflow():
    """bench/bench_workflow.py (its builders), imported once."""
    global _bw
    if _bw is None:
        if BENCH_DIR not in sys.path:
            sys.path.append(BENCH_DIR)        # bench_workflow imports its neighbours common / bench_encode
        spec = importlib.util.spec_from_file_location("zimage_vl_bench_workflow", os.path.join(BENCH_DIR, "bench_workflow.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _bw = module
    return _bw


def _device_dtype():
    device = mm.get_torch_device()
    return device, (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _settle():
    """Drop what building left on the GPU (the builders fill weights there, then move them to host memory)."""
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


class _Loader:
    CATEGORY = CATEGORY
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"size": _SIZE}}

    def build(self, size):
        device, dtype = _device_dtype()
        out = self.make(bench_workflow(), size == "tiny", device, dtype)
        _settle()
        return (out,)


class BenchZImageModel(_Loader):
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = "BENCH ONLY: Z-Image Turbo DiT, real architecture, random weights (bench_workflow.build_dit)."

    @staticmethod
    def make(bw, tiny, device, dtype):
        return bw.build_dit(tiny, device, dtype, host_loader=True)[0]


class BenchZImageTextEncoder(_Loader):
    RETURN_TYPES = ("CLIP",)
    DESCRIPTION = "BENCH ONLY: Z-Image's Qwen3-4B text encoder, random weights (bench_workflow.build_text_encoder)."

    @staticmethod
    def make(bw, tiny, device, dtype):
        return bw.build_text_encoder(tiny, device, dtype, host_loader=True)


class BenchQwen3VLClip(_Loader):
    RETURN_TYPES = ("CLIP",)
    DESCRIPTION = "BENCH ONLY: ComfyUI's native Qwen3-VL-4B, random weights (bench_workflow.build_vl)."

    @staticmethod
    def make(bw, tiny, device, dtype):
        return bw.build_vl(tiny, device, dtype, host_loader=True)


class BenchVAE(_Loader):
    RETURN_TYPES = ("VAE",)
    DESCRIPTION = "BENCH ONLY: 16-channel Flux VAE, random weights (bench_workflow.build_vae; no tiny variant)."

    @staticmethod
    def make(bw, tiny, device, dtype):
        return bw.build_vae(device)


class BenchLoadImage:
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("IMAGE", "MASK")
    DESCRIPTION = "BENCH ONLY: an RGB file of the input folder as LoadImage returns it, read with PIL (no PyAV)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("STRING", {"default": "", "tooltip": "File name in the input folder."})}}

    def load(self, image):
        import numpy as np
        from PIL import Image

        with Image.open(folder_paths.get_annotated_filepath(image)) as im:
            pixels = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]
        device, dtype = mm.intermediate_device(), mm.intermediate_dtype()
        return pixels.to(device=device, dtype=dtype), torch.zeros((1, 64, 64), device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------ recorder

class _DeviceSampler(threading.Thread):
    """Peak of the device's used memory (total - free) since the last reset, sampled every `period` seconds."""

    def __init__(self, device, period=0.002):
        super().__init__(daemon=True, name="zimage_vl_bench_mem")
        self.device, self.period, self.peak, self.active = device, period, 0, False

    def used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def reset(self) -> int:
        self.peak = self.used()
        self.active = True
        return self.peak

    def run(self):
        while True:
            if self.active:
                self.peak = max(self.peak, self.used())
            time.sleep(self.period)


_sampler: _DeviceSampler | None = None
_unloaded_prompts: set = set()


def _cuda_device():
    device = mm.get_torch_device()
    return device if device.type == "cuda" else None


def _stats(device) -> dict:
    if device is None:
        return {}
    out = {"alloc": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}
    try:
        out["peak_alloc"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    except RuntimeError:                     # an allocator without statistics
        pass
    return out


def _unload(device):
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if device is not None:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _header(device) -> dict:
    import comfy.memory_management as cmm

    info = {"vram_state": str(mm.vram_state), "aimdo_enabled": bool(getattr(cmm, "aimdo_enabled", False)),
            "argv": sys.argv[1:], "torch": torch.__version__, "device": str(mm.get_torch_device()),
            "extra_reserved_vram": mm.extra_reserved_memory(),
            "core_model_patcher": comfy.model_patcher.CoreModelPatcher.__name__}
    if device is not None:
        info.update(gpu=torch.cuda.get_device_name(device), total=torch.cuda.get_device_properties(device).total_memory)
    return info


def _write(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


_records: dict = {}
_original_execute = execution.execute


async def _recording_execute(server, dynprompt, caches, current_item, extra_data, executed, prompt_id, *rest):
    cfg = (extra_data or {}).get(EXTRA_KEY)
    if not cfg:
        return await _original_execute(server, dynprompt, caches, current_item, extra_data, executed, prompt_id, *rest)
    global _sampler
    device = _cuda_device()
    if device is not None and _sampler is None:
        _sampler = _DeviceSampler(device)
        _sampler.start()
    path = os.path.join(folder_paths.get_output_directory(), os.path.basename(cfg["file"]))
    rec = _records.setdefault(path, {"header": _header(device), "nodes": []})
    node = dynprompt.get_node(current_item)
    cached = (await caches.outputs.get(current_item)) is not None
    unload = (not cached and cfg.get("isolate")) or (cfg.get("unload_first") and prompt_id not in _unloaded_prompts)
    _unloaded_prompts.add(prompt_id)
    if unload:
        _unload(device)
    if device is not None:
        torch.cuda.synchronize(device)
        start = _stats(device)
        try:
            torch.cuda.reset_peak_memory_stats(device)
        except RuntimeError:                 # an allocator without statistics
            pass
        start_used = _sampler.reset()
    t0 = time.perf_counter()
    result = await _original_execute(server, dynprompt, caches, current_item, extra_data, executed, prompt_id, *rest)
    if device is not None:
        torch.cuda.synchronize(device)
    row = {"node": current_item, "class_type": node["class_type"], "title": node.get("_meta", {}).get("title"),
           "cached": cached, "unloaded_before": bool(unload), "ms": 1e3 * (time.perf_counter() - t0)}
    if device is not None:
        end = _stats(device)
        row.update(start_alloc=start["alloc"], start_reserved=start["reserved"], start_used=start_used,
                   end_alloc=end["alloc"], end_reserved=end["reserved"], end_used=_sampler.used(),
                   peak_alloc=end.get("peak_alloc"), peak_reserved=end.get("peak_reserved"),
                   peak_used=max(_sampler.peak, _sampler.used()))
    row["loaded_after"] = bench_workflow().loaded_models()
    rec["nodes"].append(row)
    _write(path, rec)
    return result


execution.execute = _recording_execute

NODE_CLASS_MAPPINGS = {
    "BenchZImageModel": BenchZImageModel,
    "BenchZImageTextEncoder": BenchZImageTextEncoder,
    "BenchQwen3VLClip": BenchQwen3VLClip,
    "BenchVAE": BenchVAE,
    "BenchLoadImage": BenchLoadImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: k.replace("Bench", "Bench ") + " (BENCH)" for k in NODE_CLASS_MAPPINGS}
