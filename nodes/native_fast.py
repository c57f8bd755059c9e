"""What the native backend needs from ComfyUI's Qwen3-VL: which CLIPs hold the plain model (its modules), the
runner spec of their config, a weight source through ComfyUI's own casting, and which weights it cannot read."""
from __future__ import annotations

import torch

from ..vl_core.encoders.qwen3vl_spec import Qwen3VLSpec, UnsupportedModel
from ..vl_core.encoders.weights import DirectWeights

FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# CLIPLoader types (nodes.py) under which comfy/sd.py loads a Qwen3-VL-4B file as the plain Qwen3VL
# class: every type except these, which build a different encoder from the same weights.
CLIPLOADER_TYPES_NOT_PLAIN_QWEN3VL_4B = ("flux2", "krea2", "mage")
NOT_QWEN3VL_HINT = ("load qwen3vl_4b with CLIPLoader type 'lumina2' or 'stable_diffusion' (any type except "
                    + ", ".join(repr(t) for t in CLIPLOADER_TYPES_NOT_PLAIN_QWEN3VL_4B)
                    + ", which load it as a different encoder), or use Load Qwen3-VL (transformers)")


def _comfy_class_name(obj) -> str:
    """module.Class of the first ComfyUI class in obj's MRO (ComfyUI builds its encoders as `Name_` subclasses)."""
    for cls in type(obj).__mro__:
        if cls.__module__.startswith("comfy."):
            return f"{cls.__module__}.{cls.__name__.rstrip('_')}"
    return f"{type(obj).__module__}.{type(obj).__name__}"


def qwen3vl_modules(clip) -> tuple:
    """(cond_stage_model, inner clip model, Qwen3VL transformer) of a CLIP holding ComfyUI's plain Qwen3-VL text
    encoder; ValueError naming what was found and how to load it otherwise."""
    import comfy.text_encoders.qwen3vl as qwen3vl

    csm = getattr(clip, "cond_stage_model", None)
    inner = getattr(csm, getattr(csm, "clip", ""), None) if csm is not None else None
    transformer = getattr(inner, "transformer", None)
    ok = (isinstance(csm, qwen3vl.Qwen3VLTEModel) and isinstance(inner, qwen3vl.Qwen3VLClipModel)
          and isinstance(transformer, qwen3vl.Qwen3VL)
          and not isinstance(inner.options_default[0], list))
    if not ok:
        found = _comfy_class_name(csm if csm is not None else clip)
        if transformer is not None:
            found += f" with {_comfy_class_name(transformer).rsplit('.', 1)[-1]}"
        raise ValueError(f"clip is not a Qwen3-VL text encoder (found {found}): {NOT_QWEN3VL_HINT}")
    return csm, inner, transformer


def spec_from_comfy(transformer) -> Qwen3VLSpec:
    """Runner spec of ComfyUI's comfy.text_encoders.qwen3vl.Qwen3VL (UnsupportedModel where it differs)."""
    cfg, vis = transformer.model.config, transformer.visual
    if getattr(cfg, "transformer_type", "llama") != "llama":
        raise UnsupportedModel(f"transformer_type {cfg.transformer_type!r}")
    if getattr(cfg, "mlp_activation", "silu") != "silu":
        raise UnsupportedModel(f"mlp_activation {cfg.mlp_activation!r}")
    if getattr(cfg, "q_norm", None) != "gemma3" or getattr(cfg, "k_norm", None) != "gemma3":
        raise UnsupportedModel("the decoder has no q/k norms")
    if getattr(cfg, "qkv_bias", False) or getattr(cfg, "rope_scale", None) is not None:
        raise UnsupportedModel("qkv bias / rope scale")
    rope_dims = getattr(cfg, "rope_dims", None)
    if not rope_dims or len(rope_dims) != 3:
        raise UnsupportedModel(f"rope_dims {rope_dims!r} (expected the 3 MRoPE sections)")
    return Qwen3VLSpec(
        patch_size=int(vis.patch_size), temporal_patch_size=int(vis.patch_embed.temporal_patch_size),
        merge_size=int(vis.spatial_merge_size), vision_hidden=int(vis.hidden_size), vision_heads=int(vis.num_heads),
        vision_depth=len(vis.blocks), num_grid_per_side=int(vis.num_grid_per_side),
        deepstack_indexes=tuple(int(i) for i in vis.deepstack_visual_indexes),
        num_layers=int(cfg.num_hidden_layers), hidden=int(cfg.hidden_size), heads=int(cfg.num_attention_heads),
        kv_heads=int(cfg.num_key_value_heads), head_dim=int(cfg.head_dim), rope_theta=float(cfg.rope_theta),
        mrope_section=tuple(int(x) for x in rope_dims),
        mrope_interleaved=bool(getattr(cfg, "interleaved_mrope", False)), rms_eps=float(cfg.rms_norm_eps),
        deepstack_after_record=True)


class ComfyWeights(DirectWeights):
    """Runner weight source over ComfyUI's loaded modules: the module's own tensors where ComfyUI left them
    resident on the device as plain tensors; otherwise ComfyUI's own per-call cast
    (`comfy.ops.cast_bias_weight` / `uncast_bias_weight`, what the module's forward would call) for the
    modules it manages (lowvram partial loads, dynamic VRAM, LoRA weight functions)."""

    graph_safe = True       # the runner may capture a CUDA graph unless a module needed ComfyUI's cast (used_cast)

    def __init__(self, dtype: torch.dtype, device):
        super().__init__(dtype, device)
        self._direct: dict[int, bool] = {}
        self.used_cast = False

    def _is_direct(self, m) -> bool:
        key = id(m)
        hit = self._direct.get(key)
        if hit is None:
            w = m.weight
            hit = (not hasattr(m, "comfy_cast_weights")
                   or (not hasattr(m, "_v") and not getattr(m, "weight_function", None)
                       and not getattr(m, "bias_function", None)
                       and getattr(m, "weight_lowvram_function", None) is None
                       and getattr(m, "bias_lowvram_function", None) is None
                       and type(w) in (torch.Tensor, torch.nn.Parameter) and w.device == self.device))
            self._direct[key] = hit
        return hit

    def get(self, m):
        if self._is_direct(m):
            return super().get(m)
        import comfy.ops

        self.used_cast = True
        w, b, stream = comfy.ops.cast_bias_weight(m, None, dtype=self.dtype, device=self.device,
                                                  bias_dtype=self.dtype, offloadable=True)
        return w, b, ("comfy", stream)

    def release(self, m, weight, bias, token) -> None:
        import comfy.ops

        comfy.ops.uncast_bias_weight(m, weight, bias, token[1])


def unsupported_weights(named_modules) -> str | None:
    """Why the runner cannot read these (name, module) pairs' tensors (quantized, odd dtype, not materialized),
    or None."""
    for mname, m in named_modules:
        for pname, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is None:
                continue
            if type(t) not in (torch.Tensor, torch.nn.Parameter):
                return f"quantized weights ({mname}.{pname} is {type(t).__name__})"
            if t.dtype not in FAST_DTYPES and t.is_floating_point():
                return f"weights in {t.dtype} ({mname}.{pname}); the fast path computes in bf16/fp16/fp32"
            if t.is_meta:
                return f"weight {mname}.{pname} is not materialized"
    return None
