"""The two Qwen3-VL backends on the ComfyUI side, and the model-folder helpers of the loader node.

- NativeQwen3VLEncoder: ComfyUI's own Qwen3-VL (comfy/text_encoders/qwen3vl.py) from CLIPLoader.
- TransformersVLModel:  vl_core's TransformersQwen3VL wrapped in a ModelPatcher so ComfyUI loads/offloads it.

Both implement vl_core.encoders.VLEncoder with Hugging Face `hidden_states` layer numbering, plus
`encode_many(images, prompt, layers, placement) -> list[VLEmbeds]` (same-size images batched through one
forward) and `offload()` (unload this model only, through ComfyUI model management).

Native fast path: ComfyUI's own encode (`clip.tokenize(..., images=...)` + `encode_from_tokens`) runs the
vision tower and the LM in fp32 with the weights cast on every call, the LM through a float-mask attention
(math path) and every layer even when one is asked for. The fast path loads the same ModelPatcher with
`load_models_gpu`, then runs ComfyUI's loaded module objects (`visual`, `model`) through
vl_core.encoders.qwen3vl_runner: preprocessing on the device, the weights' dtype, SDPA, truncated LM.
Modules that ComfyUI manages in place (lowvram / dynamic VRAM / LoRA weight functions) get their weights
from ComfyUI's own `comfy.ops.cast_bias_weight`. Where the fast path cannot apply (quantized or odd
weights, unknown layouts, hooks/object patches) it falls back to ComfyUI's encode and logs why once.

Known difference between them (measured on identical weights, fp32): at layers 1..K, where K is the
number of DeepStack layers (3 for Qwen3-VL-4B), the *image-token* states differ by exactly the DeepStack
vision feature: transformers records hidden_states[i] as decoder layer i-1's output before DeepStack adds
its features; ComfyUI records the input of layer i, after the addition. Text tokens, layer 0 and layers
> K agree to float rounding.
"""
from __future__ import annotations

import logging
import math
import os

import torch

import comfy.model_management as model_management
import comfy.model_patcher

from ..vl_core import extract
from ..vl_core.encoders.qwen3vl_runner import (DirectWeights, Qwen3VLRunner, Qwen3VLSpec, UnsupportedModel, batch_chunks,
                                               normalize_device, release_graphs, to_output)
from ..vl_core.encoders.transformers_qwen3vl import (TransformersQwen3VL, check_qwen3vl_folder, expand_image_pads,
                                                    tokenize_chat)
from ..vl_core.types import VLEmbeds

log = logging.getLogger("comfyui-zimage-vl")

NATIVE_ENGINES = ("auto", "fast", "host")
_LOGGED: set[str] = set()
_LAYOUTS: dict = {}        # (tokenizer, chat text, images, image tokens) -> (expanded ids, prompt span)


def _log_once(message: str, *args) -> None:
    text = message % args if args else message
    if text not in _LOGGED:
        _LOGGED.add(text)
        log.warning(text)


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

VL_FOLDER_KEYS = ("text_encoders", "LLM")
MAX_FOLDER_DEPTH = 3          # models/LLM/<org>/<name>/config.json is found; deeper is not
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

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


# ====================================================================================== native backend

class NativeQwen3VLEncoder:
    """`VLEncoder` over a ComfyUI CLIP holding the plain native Qwen3-VL text encoder.

    Encodes through ComfyUI's public CLIP API on a clone (clip_layer in list mode + tokenize with
    images + encode_from_tokens), so ComfyUI loads/offloads the model itself. The original clip and
    its shared text-encoder module keep their layer settings.
    """

    def __init__(self, clip, engine: str = "auto", sdpa: str = "auto", graphs: bool = True):
        import comfy.text_encoders.qwen3vl as qwen3vl

        if engine not in NATIVE_ENGINES:
            raise ValueError(f"engine must be one of {NATIVE_ENGINES}, got {engine!r}")
        self.engine = engine
        self.sdpa = sdpa
        self.graphs = graphs             # CUDA graph replay of repeated identical encodes (GPU only)
        self.last_path = None            # "fast" or "host": which path the last encode took

        csm = getattr(clip, "cond_stage_model", None)
        inner = getattr(csm, getattr(csm, "clip", ""), None) if csm is not None else None
        transformer = getattr(inner, "transformer", None)
        ok = (isinstance(csm, qwen3vl.Qwen3VLTEModel) and isinstance(inner, qwen3vl.Qwen3VLClipModel)
              and isinstance(transformer, qwen3vl.Qwen3VL) and hasattr(transformer, "visual")
              and not isinstance(inner.options_default[0], list))
        if not ok:
            found = _comfy_class_name(csm if csm is not None else clip)
            if transformer is not None:
                found += f" with {_comfy_class_name(transformer).rsplit('.', 1)[-1]}"
            raise ValueError(f"clip is not a Qwen3-VL text encoder (found {found}): {NOT_QWEN3VL_HINT}")
        self.clip = clip
        self._inner = inner
        self._transformer = transformer
        self.num_layers = int(transformer.num_layers)
        self.width = int(transformer.model.config.hidden_size)
        sd_tokenizer = getattr(clip.tokenizer, clip.tokenizer.clip)
        self.hf_tokenizer = sd_tokenizer.tokenizer
        ids = self.hf_tokenizer(extract.IMAGE_PAD, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"the clip's tokenizer does not know {extract.IMAGE_PAD} as one token")
        self.image_pad_id = int(ids[0])
        self.source = self._source_name(clip, csm)

    @staticmethod
    def _source_name(clip, csm) -> str:
        init = getattr(clip.patcher, "cached_patcher_init", None)
        try:
            paths = init[1][0]
            return f"{os.path.basename(paths[0])} (ComfyUI {csm.clip_name})"
        except (TypeError, IndexError, KeyError):
            return f"ComfyUI {csm.clip_name}"

    def comfy_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) ComfyUI's Qwen-VL preprocessing (qwen_vl.process_qwen2vl_images: 3136..12845056 pixels,
        multiples of patch·merge) resizes an image of this size to."""
        vision = self._transformer.visual
        factor = vision.patch_size * vision.spatial_merge_size
        min_pixels, max_pixels = 3136, 12845056
        h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
        if h_bar * w_bar > max_pixels:
            beta = math.sqrt((height * width) / max_pixels)
            h_bar = max(factor, math.floor(height / beta / factor) * factor)
            w_bar = max(factor, math.floor(width / beta / factor) * factor)
        elif h_bar * w_bar < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h_bar = math.ceil(height * beta / factor) * factor
            w_bar = math.ceil(width * beta / factor) * factor
        return h_bar, w_bar

    def _image_tokens(self, image: torch.Tensor) -> tuple[int, tuple[int, int]]:
        """(token count, (h, w)) ComfyUI's own preprocessing gives this image (it may resize tiny/huge ones)."""
        vision = self._transformer.visual
        h, w = self.comfy_size(int(image.shape[0]), int(image.shape[1]))
        return (h // vision.patch_size) * (w // vision.patch_size) // vision.spatial_merge_size ** 2, (h, w)

    def _chat(self, prompt: str, num_images: int, placement: str) -> tuple[str, str, str, str]:
        before, text, after = extract.chat_pieces(prompt, num_images, placement)
        full = before + text + after
        if not full.startswith("<|im_start|>"):   # ComfyUI skips its own template (and think block) then
            raise RuntimeError("chat text must start with <|im_start|>")
        return before, text, after, full

    def _sizes(self, images) -> tuple[list[int], list[tuple[int, int]]]:
        counts, sizes = [], []
        for k, image in enumerate(images):
            n, size = self._image_tokens(image)
            if size != (int(image.shape[0]), int(image.shape[1])):
                _log_once("VL Encode (native): ComfyUI's Qwen-VL preprocessing resizes %dx%d images to %dx%d px "
                          "(it keeps 3136..12845056 pixels)", image.shape[1], image.shape[0], size[1], size[0])
            counts.append(n)
            sizes.append(size)
        return counts, sizes

    def _tokens_row(self, clip, full: str, images) -> list:
        """ComfyUI's own token row for the chat text with the images attached (ids and image dicts)."""
        tokens = clip.tokenize(full, images=[image[None] for image in images])
        key = next(iter(tokens))
        if len(tokens[key]) != 1:
            raise RuntimeError(f"ComfyUI split the text into {len(tokens[key])} chunks; expected one")
        row = [t[0] for t in tokens[key][0]]
        attached = [i for i, t in enumerate(row) if isinstance(t, dict)]
        stray = [i for i, t in enumerate(row) if not isinstance(t, dict) and int(t) == self.image_pad_id]
        if len(attached) != len(images) or stray:
            raise ValueError(f"ComfyUI attached {len(attached)} image(s) to the text for {len(images)} image(s): "
                             f"remove {extract.IMAGE_PAD} / vision tokens from the prompt")
        return tokens, row

    # ------------------------------------------------------------------ public API

    def _layout(self, before: str, text: str, after: str, full: str, images, counts) -> tuple[torch.Tensor, tuple]:
        """(expanded ids, prompt span) of the chat text as ComfyUI tokenizes it (cached: the tokenizer is
        deterministic, and the fast path needs only the ids, not ComfyUI's token/image structure)."""
        key = (id(self.clip.tokenizer), full, len(images), tuple(counts))
        hit = _LAYOUTS.get(key)
        if hit is None:
            tokens, row = self._tokens_row(self.clip, full, images)
            raw_ids = [self.image_pad_id if isinstance(t, dict) else int(t) for t in row]
            hit = self._ids_and_span(raw_ids, before, text, after, counts)
            _LAYOUTS[key] = hit
            while len(_LAYOUTS) > 64:
                _LAYOUTS.pop(next(iter(_LAYOUTS)))
        return hit

    def encode(self, images: list[torch.Tensor], prompt: str, layers: list[int], placement: str) -> VLEmbeds:
        images = list(images)
        layers = extract.check_resolved_layers(layers, self.num_layers)
        before, text, after, full = self._chat(prompt, len(images), placement)
        counts, sizes = self._sizes(images)
        input_ids, prompt_span = self._layout(before, text, after, full, images, counts)
        runner = self._fast_runner(len(images), int(input_ids.numel()), sizes)
        if runner is None:
            return self._encode_host(images, prompt, layers, placement, before, text, after, full, counts, sizes)
        hidden = self._run_fast(runner, input_ids, [[im] for im in images], sizes, layers)
        return self._embeds(hidden, input_ids, prompt_span, layers, prompt, placement, sizes)

    def encode_many(self, images, prompt: str, layers: list[int], placement: str,
                    max_batch_tokens: int = 65536) -> list[VLEmbeds]:
        """One VLEmbeds per image (= encode([image], ...)); same-size images batched through one forward."""
        images = list(images)
        layers = extract.check_resolved_layers(layers, self.num_layers)
        before, text, after, full = self._chat(prompt, 1, placement)
        results: list[VLEmbeds | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault((int(im.shape[0]), int(im.shape[1])), []).append(i)
        for members in groups.values():
            first = images[members[0]]
            counts, sizes = self._sizes([first])
            input_ids, prompt_span = self._layout(before, text, after, full, [first], counts)
            vision = self._transformer.visual
            patches = sizes[0][0] * sizes[0][1] // vision.patch_size ** 2
            for a, b in batch_chunks(len(members), patches, max_batch_tokens):
                chunk = members[a:b]
                runner = self._fast_runner(1, int(input_ids.numel()), sizes, batch=len(chunk))
                if runner is None:
                    for i in chunk:
                        results[i] = self.encode([images[i]], prompt, layers, placement)
                    continue
                hidden = self._run_fast(runner, input_ids, [[images[i] for i in chunk]], sizes, layers, output=False)
                out_device = model_management.intermediate_device()
                for row_i, i in enumerate(chunk):     # one pinned copy per image: each result owns its memory
                    results[i] = self._embeds({layer: to_output(t[row_i:row_i + 1], out_device)
                                               for layer, t in hidden.items()}, input_ids,
                                              prompt_span, layers, prompt, placement, sizes)
        return results

    def offload(self) -> bool:
        """Unload the Qwen3-VL text encoder from the GPU now (ComfyUI reloads it on the next encode)."""
        release_graphs()
        return offload_patcher(self.clip.patcher)

    # ------------------------------------------------------------------ fast path

    def _fast_runner(self, num_images: int, num_tokens: int, sizes, batch: int = 1) -> Qwen3VLRunner | None:
        """Load the model (ComfyUI model management) and return a runner over its modules, or None (host path)."""
        self.last_path = "host"
        if self.engine == "host":
            return None
        reason = self._fast_blocker()
        if reason is None:
            model_management.load_models_gpu([self.clip.patcher],
                                             memory_required=self._activation_bytes(num_tokens, sizes, batch))
            reason = self._fast_blocker(loaded=True)
        if reason is not None:
            if self.engine == "fast":
                raise RuntimeError(f"VL Encode (native): the fast path does not apply: {reason}")
            _log_once("VL Encode (native): using ComfyUI's own (slower) Qwen3-VL encode: %s", reason)
            return None
        device = self.clip.patcher.load_device
        dtype = self._compute_dtype(device)
        runner = getattr(self, "_runner", None)
        if runner is None:
            runner = Qwen3VLRunner(self._transformer.visual, self._transformer.model, self._spec, dtype, device,
                                   weights=ComfyWeights(dtype, device), sdpa=self.sdpa, graphs=self.graphs)
            self._runner = runner
        runner.dtype, runner.device = dtype, normalize_device(device)
        runner.weights = ComfyWeights(dtype, runner.device)
        self.last_path = "fast"
        return runner

    def _activation_bytes(self, num_tokens: int, sizes, batch: int) -> int:
        spec = self._spec
        patches = sum(h * w for h, w in sizes) // spec.patch_size ** 2
        vision = patches * spec.vision_hidden * 14 * 2          # qkv, mlp (4x), residuals: bf16 worst case
        text = num_tokens * (spec.hidden * 8 + 3 * 4 * spec.hidden) * 2
        return int(batch * (vision + text))

    def _compute_dtype(self, device) -> torch.dtype:
        dtype = self._transformer.model.embed_tokens.weight.dtype
        if dtype in (torch.bfloat16, torch.float32):
            return dtype
        # fp16 weights: Qwen3's outlier activations overflow fp16 (ComfyUI's encoder computes in fp32)
        if model_management.should_use_bf16(device):
            return torch.bfloat16
        return torch.float32

    def _fast_blocker(self, loaded: bool = False) -> str | None:
        """Why the fast path cannot run on this clip (None if it can)."""
        if not hasattr(self, "_spec"):
            try:
                self._spec = spec_from_comfy(self._transformer)
                Qwen3VLRunner(self._transformer.visual, self._transformer.model, self._spec, torch.float32,
                              "cpu").check()
                self._spec_error = None
            except (UnsupportedModel, AttributeError, TypeError, ValueError) as e:
                self._spec_error = f"unknown module layout ({e})"
        if self._spec_error:
            return self._spec_error
        patcher = self.clip.patcher
        if getattr(patcher, "forced_hooks", None) is not None or getattr(patcher, "hook_patches", None):
            return "the clip has hooks (scheduled / hooked encodes need ComfyUI's encoder)"
        if getattr(self.clip, "apply_hooks_to_conds", None):
            return "the clip has hooks (scheduled / hooked encodes need ComfyUI's encoder)"
        clip_name = getattr(self.clip.cond_stage_model, "clip", None)
        patched = [k for k in (getattr(patcher, "object_patches", None) or {})
                   if clip_name and (k == clip_name or k.startswith(clip_name + "."))]
        if patched:
            return f"the clip has object patches on its modules ({', '.join(sorted(patched)[:3])})"
        if loaded:
            modules = getattr(self, "_modules_list", None)
            if modules is None:     # the module tree is fixed; ComfyUI may swap the tensors inside it (loads, LoRA)
                modules = self._modules_list = list(self._transformer.named_modules())
            ok = (torch.float32, torch.bfloat16, torch.float16)
            for mname, m in modules:
                for pname, t in list(m._parameters.items()) + list(m._buffers.items()):
                    if t is None:
                        continue
                    if type(t) not in (torch.Tensor, torch.nn.Parameter):
                        return f"quantized weights ({mname}.{pname} is {type(t).__name__})"
                    if t.dtype not in ok and t.is_floating_point():
                        return f"weights in {t.dtype} ({mname}.{pname}); the fast path computes in bf16/fp16/fp32"
                    if t.is_meta:
                        return f"weight {mname}.{pname} is not materialized"
        return None

    def _run_fast(self, runner: Qwen3VLRunner, input_ids: torch.Tensor, images: list[list[torch.Tensor]], sizes,
                  layers, output: bool = True) -> dict[int, torch.Tensor]:
        """images[k]: the k-th image of each sequence (one sequence per element): run and return float32
        states on ComfyUI's intermediate device."""
        import torch.nn.functional as F

        device = runner.device
        slots = []
        for k, size in enumerate(sizes):
            batch = torch.stack([im.to(device, non_blocking=True) for im in images[k]]) if len(images[k]) > 1 \
                else images[k][0].to(device, non_blocking=True)[None]
            if tuple(batch.shape[1:3]) != tuple(size):   # ComfyUI's own resize (bilinear, no antialias)
                batch = F.interpolate(batch.permute(0, 3, 1, 2).float(), size=size, mode="bilinear",
                                      align_corners=False).permute(0, 2, 3, 1)
            slots.append(batch)
        with model_management.cuda_device_context(device):
            hidden = runner.forward(input_ids.tolist(), self.image_pad_id, slots, layers)
            if not output:
                return hidden
            out_device = model_management.intermediate_device()
            return {layer: to_output(t, out_device) for layer, t in hidden.items()}

    def _embeds(self, hidden, input_ids, prompt_span, layers, prompt, placement, sizes) -> VLEmbeds:
        hidden = {layer: t.clone() if t.is_inference() else t for layer, t in hidden.items()}   # plain tensors
        return extract.build_embeds(hidden, input_ids, self.image_pad_id, prompt_span, layers, self.num_layers,
                                    placement=placement, source=self.source, prompt=prompt,
                                    image_sizes=tuple(sizes))

    # ------------------------------------------------------------------ host path (ComfyUI's own encode)

    def _encode_host(self, images, prompt, layers, placement, before, text, after, full, counts, sizes) -> VLEmbeds:
        self.last_path = "host"
        clip = self.clip.clone()
        clip.clip_layer(list(layers))
        tokens, row = self._tokens_row(clip, full, images)
        saved = (self._inner.layer, self._inner.layer_idx, self._inner.return_projected_pooled,
                 self._inner.execution_device)
        try:
            out = clip.encode_from_tokens(tokens, return_dict=True)
        finally:  # the text-encoder module is shared with the original clip: leave its options as found
            (self._inner.layer, self._inner.layer_idx, self._inner.return_projected_pooled,
             self._inner.execution_device) = saved
        cond = out["cond"]
        if cond.ndim != 4 or cond.shape[1] != len(layers):
            raise RuntimeError(f"ComfyUI returned {tuple(cond.shape)} for layers {layers}; expected "
                               f"[1, {len(layers)}, N, D]")
        image_total = cond.shape[2] - (len(row) - len(images))
        if image_total != sum(counts):
            raise RuntimeError(f"ComfyUI encoded {image_total} image tokens; its preprocessing implies {sum(counts)}")

        raw_ids = [self.image_pad_id if isinstance(t, dict) else int(t) for t in row]
        input_ids, prompt_span = self._ids_and_span(raw_ids, before, text, after, counts)
        hidden = {j_layer: cond[:, j].float() for j, j_layer in enumerate(layers)}
        return self._embeds(hidden, input_ids, prompt_span, layers, prompt, placement, sizes)

    def _ids_and_span(self, raw_ids: list[int], before: str, text: str, after: str,
                      counts: list[int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Expanded ids and the prompt span, from the ids ComfyUI actually encoded."""
        tok = self.hf_tokenizer
        plain_ids, raw_span = tokenize_chat(tok, before, text, after)
        if plain_ids != raw_ids:  # ComfyUI tokenized differently (e.g. "embedding:" or "\\(" in the prompt)
            log.warning("VL Encode (native): ComfyUI's tokens differ from a plain tokenization of the chat text; "
                        "the prompt span is estimated from the template")
            n_after = len(tok(after, add_special_tokens=False)["input_ids"])
            raw_span = (len(tok(before, add_special_tokens=False)["input_ids"]), len(raw_ids) - n_after)
        return expand_image_pads(raw_ids, raw_span, self.image_pad_id, counts)


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


# ====================================================================================== transformers backend

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
        model_management.load_models_gpu([self.patcher], force_full_load=True)
        self.encoder.output_device = model_management.intermediate_device()

    def encode(self, images: list[torch.Tensor], prompt: str, layers: list[int], placement: str) -> VLEmbeds:
        self._load()
        with model_management.cuda_device_context(self.patcher.load_device):
            return self.encoder.encode(images, prompt, layers, placement)

    def encode_many(self, images, prompt: str, layers: list[int], placement: str,
                    max_batch_tokens: int = 65536) -> list[VLEmbeds]:
        """One VLEmbeds per image; same-size images batched through one forward (one model load)."""
        self._load()
        with model_management.cuda_device_context(self.patcher.load_device):
            return self.encoder.encode_many(images, prompt, layers, placement, max_batch_tokens=max_batch_tokens)

    def offload(self) -> bool:
        """Unload the model from the GPU now (ComfyUI reloads it on the next encode)."""
        release_graphs()
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
    if dtype_name != "auto" and dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {dtype_name!r}")
    load_device = model_management.text_encoder_device()
    offload_device = model_management.text_encoder_offload_device()
    dtype = auto_dtype(load_device) if dtype_name == "auto" else DTYPES[dtype_name]
    encoder = TransformersQwen3VL.from_pretrained(folder_path, dtype=dtype, device=offload_device)
    encoder.output_device = model_management.intermediate_device()
    log.info("Loaded Qwen3-VL (transformers) %s: %d layers, width %d, %s", encoder.source, encoder.num_layers,
             encoder.width, dtype)
    return TransformersVLModel(encoder, load_device=load_device, offload_device=offload_device)


# ====================================================================================== model folders

def register_folders() -> None:
    """Register ComfyUI folder key "LLM" (models/LLM) if no one has yet. Called at node-load time."""
    import folder_paths

    if "LLM" not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path("LLM", os.path.join(folder_paths.models_dir, "LLM"))


register_llm_folder = register_folders


def _vl_roots() -> list[str]:
    import folder_paths

    register_folders()
    roots = []
    for key in VL_FOLDER_KEYS:
        try:
            roots.extend(folder_paths.get_folder_paths(key))
        except KeyError:
            continue
    return [os.path.abspath(r) for r in roots]


def list_vl_folders() -> list[str]:
    """Sub-folders (up to MAX_FOLDER_DEPTH deep, '/'-separated) of models/text_encoders and models/LLM
    that hold a config.json, sorted; the first root wins for a name found twice."""
    names: list[str] = []
    for root in _vl_roots():
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if depth >= MAX_FOLDER_DEPTH:
                dirnames[:] = []
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if depth > 0 and "config.json" in filenames:
                name = rel.replace(os.sep, "/")
                if name not in names:
                    names.append(name)
                dirnames[:] = []          # a model folder's sub-folders are not models
    return sorted(names)


def resolve_vl_folder(name: str) -> str:
    """Absolute path of a name from list_vl_folders(); ValueError for names outside those folders or missing."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("no Qwen3-VL folder given: put the Hugging Face Qwen3-VL-4B-Instruct folder under "
                         "models/text_encoders or models/LLM and pick it")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or any(p in ("", ".", "..") for p in parts) or ":" in name:
        raise ValueError(f"folder name {name!r} is not a plain sub-folder of models/text_encoders or models/LLM")
    roots = _vl_roots()
    for root in roots:
        path = os.path.normpath(os.path.join(root, *parts))
        if os.path.commonpath([root, path]) != root:
            continue
        if os.path.isfile(os.path.join(path, "config.json")):
            return check_qwen3vl_folder(path)
    raise ValueError(f"Qwen3-VL folder {name!r} not found with a config.json under {roots}")
