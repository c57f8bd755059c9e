"""Transformers backend on the ComfyUI side: vl_core's TransformersQwen3VL wrapped in a ModelPatcher, so
ComfyUI loads it to the GPU and offloads it like any model (the QWEN3VL_MODEL value), and its loader."""
from __future__ import annotations

import logging

import torch

import comfy.model_management as model_management
import comfy.model_patcher

from ..vl_core.checks import require_choice
from ..vl_core.encoders.qwen3vl_runner import prefetch
from ..vl_core.encoders.transformers_qwen3vl import TransformersQwen3VL
from ..vl_core.types import VLEmbeds
from .offload import ensure_loaded, offload_patcher

log = logging.getLogger("comfyui-zimage-vl")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _PatcherHost(torch.nn.Module):
    """What the ModelPatcher manages: the HF model as a submodule (ModelPatcher writes `model.device`,
    which is a read-only property on a transformers PreTrainedModel)."""

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        self.hf = hf_model


def _unique_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's distinct tensors (ComfyUI's module_size counts tied embeddings twice)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nelement() * t.element_size()
    return total


class TransformersVLModel:
    """The QWEN3VL_MODEL value: a TransformersQwen3VL that ComfyUI loads to the GPU / offloads like any model."""

    def __init__(self, encoder: TransformersQwen3VL, load_device=None, offload_device=None):
        self.encoder = encoder
        host = _PatcherHost(encoder.model)
        self.patcher = comfy.model_patcher.ModelPatcher(
            host, size=_unique_bytes(host),
            load_device=load_device if load_device is not None else model_management.text_encoder_device(),
            offload_device=(offload_device if offload_device is not None
                            else model_management.text_encoder_offload_device()))

    @property
    def source(self) -> str:
        return self.encoder.source

    @property
    def num_layers(self) -> int:
        return self.encoder.num_layers

    @property
    def width(self) -> int:
        return self.encoder.width

    def _load(self) -> None:
        # full load: the HF modules have no ComfyUI weight casting, so a partial (lowvram) load cannot run
        token = ensure_loaded(self.patcher, force_full_load=True)
        self.encoder.output_device = model_management.intermediate_device()
        runner = self.encoder.fast_runner()
        if runner is not None:
            runner.residency = token       # forward packs the projections under it where needed

    def encode(self, images: list[torch.Tensor], prompt: str, layers: list[int], placement: str) -> VLEmbeds:
        images = list(images)
        with prefetch(getattr(self.encoder, "_runner", None), images):   # (the encoder's own block reuses these)
            self._load()
            with model_management.cuda_device_context(self.patcher.load_device):
                return self.encoder.encode(images, prompt, layers, placement)

    def encode_many(self, images, prompt: str, layers: list[int], placement: str,
                    max_batch_tokens: int = 65536) -> list[VLEmbeds]:
        """One VLEmbeds per image; same-size images batched through one forward (one model load)."""
        self._load()
        with model_management.cuda_device_context(self.patcher.load_device):
            return self.encoder.encode_many(images, prompt, layers, placement, max_batch_tokens=max_batch_tokens)

    def text_ids(self, prompt: str, placement: str = "after_image") -> list[int]:
        """The ids encode([], prompt, ..., placement) runs."""
        return self.encoder.text_ids(prompt, placement)

    def encode_texts(self, prompts, layers: list[int], placement: str = "after_image",
                     max_batch_tokens: int = 16384) -> list[VLEmbeds]:
        """One VLEmbeds per text-only prompt; prompts batched right-padded through one forward (one model load)."""
        self._load()
        with model_management.cuda_device_context(self.patcher.load_device):
            return self.encoder.encode_texts(prompts, layers, placement, max_batch_tokens=max_batch_tokens)

    def offload(self) -> bool:
        """Unload the model from the GPU now (ComfyUI reloads it on the next encode), and its CUDA graphs."""
        self.encoder.release_graphs()
        runner = getattr(self.encoder, "_runner", None)
        if runner is not None:
            runner.residency = None              # (set again by the next load)
        return offload_patcher(self.patcher)

    def __repr__(self) -> str:
        return f"TransformersVLModel({self.source!r}, {self.num_layers} layers, width {self.width})"


def auto_dtype(device) -> torch.dtype:
    """"auto": ComfyUI's text-encoder dtype for the device, except that ComfyUI's generic fp16 default
    becomes bf16 (fp32 on CPU): transformers computes in the weight dtype and Qwen3's outlier activations
    overflow fp16, where ComfyUI's own encoder computes in fp32. An explicit --fp16-text-enc is kept."""
    from comfy.cli_args import args

    dtype = model_management.text_encoder_dtype(device)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):   # fp8 flags: transformers cannot compute in it
        dtype = torch.float16
    if dtype == torch.float16 and not args.fp16_text_enc:
        if model_management.is_device_cpu(device):
            return torch.float32
        if model_management.should_use_bf16(device):
            return torch.bfloat16
    return dtype


def load_transformers_vl(folder_path: str, dtype_name: str = "auto") -> TransformersVLModel:
    """Load a Hugging Face Qwen3-VL folder (offline) onto ComfyUI's text-encoder offload device."""
    require_choice("dtype", dtype_name, ["auto", *DTYPES])
    load_device = model_management.text_encoder_device()
    offload_device = model_management.text_encoder_offload_device()
    dtype = auto_dtype(load_device) if dtype_name == "auto" else DTYPES[dtype_name]
    encoder = TransformersQwen3VL.from_pretrained(folder_path, dtype=dtype, device=offload_device)
    encoder.output_device = model_management.intermediate_device()
    log.info("Loaded Qwen3-VL (transformers) %s: %d layers, width %d, %s", encoder.source, encoder.num_layers,
             encoder.width, dtype)
    return TransformersVLModel(encoder, load_device=load_device, offload_device=offload_device)
