"""Native backend: the VLEncoder adapter over ComfyUI's own Qwen3-VL (comfy/text_encoders/qwen3vl.py) from CLIPLoader.

NativeQwen3VLEncoder implements vl_core.encoders.VLEncoder with Hugging Face `hidden_states` layer
numbering, plus `encode_many(images, prompt, layers, placement) -> list[VLEmbeds]` (same-size images
batched through one forward) and `offload()` (unload this model only, through ComfyUI model management).

Native fast path: ComfyUI's own encode (`clip.tokenize(..., images=...)` + `encode_from_tokens`) runs the
vision tower and the LM in fp32 with the weights cast on every call, the LM through a float-mask attention
(math path) and every layer even when one is asked for. The fast path loads the same ModelPatcher with
`load_models_gpu`, then runs ComfyUI's loaded module objects (`visual`, `model`) through
vl_core.encoders.qwen3vl_runner: preprocessing on the device, the weights' dtype, SDPA, truncated LM.
Modules that ComfyUI manages in place (lowvram / dynamic VRAM / LoRA weight functions) get their weights
from ComfyUI's own `comfy.ops.cast_bias_weight`. Where the fast path cannot apply (quantized or odd
weights, unknown layouts, hooks/object patches) it falls back to ComfyUI's encode and logs why once.
Repeated identical encodes replay CUDA graphs from the encoder's own GraphCache; offload() releases them.
Nodes take the clip's long-lived encoder (`NativeQwen3VLEncoder.for_clip`), so graphs survive node runs.

Known difference between them (measured on identical weights, fp32): at layers 1..K, where K is the
number of DeepStack layers (3 for Qwen3-VL-4B), the *image-token* states differ by exactly the DeepStack
vision feature: transformers records hidden_states[i] as decoder layer i-1's output before DeepStack adds
its features; ComfyUI records the input of layer i, after the addition. Text tokens, layer 0 and layers
> K agree to float rounding.
"""
from __future__ import annotations

import logging
import os
import weakref

import torch

import comfy.model_management as model_management

from ..vl_core import extract, layout, preprocess
from ..vl_core.checks import require_choice
from ..vl_core.encoders.batching import activation_bytes, length_batches, same_size_batches, text_rows_forward
from ..vl_core.encoders.graph_cache import GraphCache
from ..vl_core.encoders.qwen3vl_runner import Qwen3VLRunner, prefetch
from ..vl_core.encoders.qwen3vl_spec import UnsupportedModel
from ..vl_core.encoders.weights import normalize_device, to_outputs
from ..vl_core.types import VLEmbeds
from .native_fast import ComfyWeights, qwen3vl_modules, spec_from_comfy, unsupported_weights
from .offload import ensure_loaded, offload_patcher

log = logging.getLogger("comfyui-zimage-vl")

NATIVE_ENGINES = ("auto", "fast", "host")
_LOGGED: set[str] = set()
_LAYOUTS: dict = {}        # (tokenizer, chat text, images, image tokens) -> (expanded ids, prompt span): a memo
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # clip -> its long-lived encoder (for_clip)


def _log_once(message: str, *args) -> None:
    text = message % args if args else message
    if text not in _LOGGED:
        _LOGGED.add(text)
        log.warning(text)


class NativeQwen3VLEncoder:
    """`VLEncoder` over a ComfyUI CLIP holding the plain native Qwen3-VL text encoder.

    Encodes through ComfyUI's public CLIP API on a clone (clip_layer in list mode + tokenize with
    images + encode_from_tokens), so ComfyUI loads/offloads the model itself. The original clip and
    its shared text-encoder module keep their layer settings.
    """

    def __init__(self, clip, engine: str = "auto", graphs: bool = True):
        require_choice("engine", engine, NATIVE_ENGINES)
        self.engine = engine
        self.graphs = GraphCache() if graphs else None   # CUDA graph replay of repeated identical encodes (GPU)
        self.last_path = None            # "fast" or "host": which path the last encode took

        csm, inner, transformer = qwen3vl_modules(clip)
        self._clip_ref = weakref.ref(clip)
        self._clip_hold = clip          # strong unless the encoder is the clip's shared one (for_clip)
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
        self._runner: Qwen3VLRunner | None = None      # built on the first fast encode
        self._spec = self._spec_error = None            # runner spec of the modules, or why there is none
        self._modules_list = None                       # named_modules(): the tree is fixed, its tensors are not
        self._weights_checked = (None, None)            # (residency token, unsupported_weights result)

    @classmethod
    def for_clip(cls, clip) -> "NativeQwen3VLEncoder":
        """The clip's long-lived encoder (engine "auto"), which nodes use: its runner, CUDA graphs and weight
        checks last across node runs (a re-run with another image of the same size replays the captured graph)
        and go when the clip does (the cache and the encoder hold the clip weakly; each clip clone, e.g. with a
        LoRA, gets its own)."""
        try:
            enc = _SHARED.get(clip)
        except TypeError:               # not weak-referenceable: a fresh encoder each time
            return cls(clip)
        if enc is None:
            enc = cls(clip)
            enc._clip_hold = None
            _SHARED[clip] = enc
        return enc

    @property
    def clip(self):
        clip = self._clip_hold if self._clip_hold is not None else self._clip_ref()
        if clip is None:
            raise RuntimeError("VL Encode (native): this encoder's clip no longer exists; get one from the clip")
        return clip

    @staticmethod
    def _source_name(clip, csm) -> str:
        init = getattr(clip.patcher, "cached_patcher_init", None)
        try:
            paths = init[1][0]
            return f"{os.path.basename(paths[0])} (ComfyUI {csm.clip_name})"
        except (TypeError, IndexError, KeyError):
            return f"ComfyUI {csm.clip_name}"

    def _comfy_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) ComfyUI's own Qwen-VL preprocessing resizes an image of this size to (it may resize tiny/huge ones)."""
        vision = self._transformer.visual
        return preprocess.qwen_vl_resize(height, width, vision.patch_size * vision.spatial_merge_size)

    def _image_tokens(self, image: torch.Tensor) -> tuple[int, tuple[int, int]]:
        """(token count, (h, w)) ComfyUI's own preprocessing gives this image."""
        vision = self._transformer.visual
        h, w = self._comfy_size(int(image.shape[0]), int(image.shape[1]))
        return preprocess.image_tokens(h, w, vision.patch_size, vision.spatial_merge_size), (h, w)

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
        def make():
            tokens, row = self._tokens_row(self.clip, full, images)
            raw_ids = [self.image_pad_id if isinstance(t, dict) else int(t) for t in row]
            return self._ids_and_span(raw_ids, before, text, after, counts)

        return layout.memoized(_LAYOUTS, (id(self.clip.tokenizer), full, len(images), tuple(counts)), make)

    def encode(self, images: list[torch.Tensor], prompt: str, layers: list[int], placement: str) -> VLEmbeds:
        images = list(images)
        with prefetch(self._runner, images):     # the images' staging copies beside the host work up to the forward
            return self._encode(images, prompt, layers, placement)

    def _encode(self, images: list[torch.Tensor], prompt: str, layers: list[int], placement: str) -> VLEmbeds:
        layers = extract.check_resolved_layers(layers, self.num_layers)
        before, text, after, full = self._chat(prompt, len(images), placement)
        counts, sizes = self._sizes(images)
        input_ids, prompt_span = self._layout(before, text, after, full, images, counts)
        runner = self._fast_runner(len(images), int(input_ids.numel()), sizes)
        if runner is None:
            return self._encode_host(images, prompt, layers, placement, before, text, after, full, counts, sizes)
        hidden = self._run_fast(runner, input_ids, [[im] for im in images], sizes, layers)
        spans = extract.find_runs(input_ids, self.image_pad_id)     # host work while the GPU still runs
        hidden = to_outputs(hidden, model_management.intermediate_device())
        return self._embeds(hidden, input_ids, prompt_span, layers, prompt, placement, sizes, spans)

    def encode_many(self, images, prompt: str, layers: list[int], placement: str,
                    max_batch_tokens: int = 65536) -> list[VLEmbeds]:
        """One VLEmbeds per image (= encode([image], ...)); same-size images batched through one forward."""
        images = list(images)
        layers = extract.check_resolved_layers(layers, self.num_layers)
        before, text, after, full = self._chat(prompt, 1, placement)
        results: list[VLEmbeds | None] = [None] * len(images)
        patch = self._transformer.visual.patch_size

        def patches_of(h: int, w: int) -> int:     # at the size ComfyUI's preprocessing gives the image
            h, w = self._comfy_size(h, w)
            return h * w // patch ** 2

        for group, chunks in same_size_batches(images, patches_of, max_batch_tokens):
            first = images[group[0]]
            counts, sizes = self._sizes([first])
            input_ids, prompt_span = self._layout(before, text, after, full, [first], counts)
            for chunk in chunks:
                runner = self._fast_runner(1, int(input_ids.numel()), sizes, batch=len(chunk))
                if runner is None:
                    for i in chunk:
                        results[i] = self.encode([images[i]], prompt, layers, placement)
                    continue
                hidden = self._run_fast(runner, input_ids, [[images[i] for i in chunk]], sizes, layers)
                out_device = model_management.intermediate_device()
                for row_i, i in enumerate(chunk):     # one pinned copy per image: each result owns its memory
                    rows = to_outputs({layer: t[row_i:row_i + 1] for layer, t in hidden.items()}, out_device)
                    results[i] = self._embeds(rows, input_ids, prompt_span, layers, prompt, placement, sizes)
        return results

    def text_ids(self, prompt: str, placement: str = "after_image") -> list[int]:
        """The ids encode([], prompt, ..., placement) runs: ComfyUI's own tokenization of the chat text."""
        before, text, after, full = self._chat(prompt, 0, placement)
        return self._layout(before, text, after, full, [], [])[0].tolist()

    def encode_texts(self, prompts, layers: list[int], placement: str = "after_image",
                     max_batch_tokens: int = 16384) -> list[VLEmbeds]:
        """One VLEmbeds per text-only prompt (= encode([], prompt, ...)); prompts of any lengths run right-padded
        through one forward per batch of at most max_batch_tokens padded tokens (batching.text_rows_forward)."""
        prompts = list(prompts)
        layers = extract.check_resolved_layers(layers, self.num_layers)
        layouts = [self._layout(*self._chat(p, 0, placement), [], []) for p in prompts]
        results: list[VLEmbeds | None] = [None] * len(prompts)
        for batch in length_batches([int(layouts[i][0].numel()) for i in range(len(prompts))], max_batch_tokens):
            runner = self._fast_runner(0, int(layouts[batch[0]][0].numel()), [], batch=len(batch))
            if runner is None:
                for i in batch:
                    results[i] = self.encode([], prompts[i], layers, placement)
                continue
            with model_management.cuda_device_context(runner.device):
                hidden = text_rows_forward(runner, [layouts[i][0].tolist() for i in batch], self.image_pad_id, layers)
            out_device = model_management.intermediate_device()
            for row, i in enumerate(batch):
                ids, span = layouts[i]
                rows = to_outputs({layer: t[row:row + 1, :ids.numel()] for layer, t in hidden.items()}, out_device)
                results[i] = self._embeds(rows, ids, span, layers, prompts[i], placement, [])
        return results

    def offload(self) -> bool:
        """Unload the Qwen3-VL text encoder from the GPU now (ComfyUI reloads it on the next encode), and the
        CUDA graphs this encoder captured."""
        if self.graphs is not None:
            self.graphs.release()
        if self._runner is not None:
            self._runner.residency = None        # (set again by the next load)
        return offload_patcher(self.clip.patcher)

    # ------------------------------------------------------------------ fast path

    def _fast_runner(self, num_images: int, num_tokens: int, sizes, batch: int = 1) -> Qwen3VLRunner | None:
        """Load the model (ComfyUI model management) and return a runner over its modules, or None (host path)."""
        self.last_path = "host"
        if self.engine == "host":
            return None
        reason, token = self._fast_blocker(), None
        if reason is None:
            token = ensure_loaded(self.clip.patcher,
                                  memory_required=activation_bytes(self._spec, num_tokens, sizes, batch))
            reason = self._fast_blocker(loaded=True, token=token)
        if reason is not None:
            if self.engine == "fast":
                raise RuntimeError(f"VL Encode (native): the fast path does not apply: {reason}")
            _log_once("VL Encode (native): using ComfyUI's own (slower) Qwen3-VL encode: %s", reason)
            return None
        device = self.clip.patcher.load_device
        dtype = self._compute_dtype(device)
        runner = self._runner
        if runner is None:
            runner = Qwen3VLRunner(self._transformer.visual, self._transformer.model, self._spec, dtype, device,
                                   weights=ComfyWeights(dtype, device), graphs=self.graphs)
            self._runner = runner
        runner.dtype, runner.device = dtype, normalize_device(device)
        runner.weights = ComfyWeights(dtype, runner.device)
        runner.residency = token           # forward packs the projections under it where needed
        self.last_path = "fast"
        return runner

    def _compute_dtype(self, device) -> torch.dtype:
        dtype = self._transformer.model.embed_tokens.weight.dtype
        if dtype in (torch.bfloat16, torch.float32):
            return dtype
        # fp16 weights: Qwen3's outlier activations overflow fp16 (ComfyUI's encoder computes in fp32)
        if model_management.should_use_bf16(device):
            return torch.bfloat16
        return torch.float32

    def _fast_blocker(self, loaded: bool = False, token: tuple | None = None) -> str | None:
        """Why the fast path cannot run on this clip (None if it can). loaded: the model was just loaded; token:
        its residency (offload.residency), under which the weight check is reused while ComfyUI leaves them be."""
        if self._spec is None and self._spec_error is None:
            try:
                spec = spec_from_comfy(self._transformer)
                Qwen3VLRunner(self._transformer.visual, self._transformer.model, spec, torch.float32, "cpu").check()
                self._spec = spec
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
            if self._modules_list is None:    # ComfyUI may swap the tensors inside the tree (loads, LoRA)
                self._modules_list = list(self._transformer.named_modules())
            if token is None or self._weights_checked[0] != token:
                self._weights_checked = (token, unsupported_weights(self._modules_list))
            return self._weights_checked[1]
        return None

    def _run_fast(self, runner: Qwen3VLRunner, input_ids: torch.Tensor, images: list[list[torch.Tensor]], sizes,
                  layers) -> dict[int, torch.Tensor]:
        """images[k]: the k-th image of each sequence (one sequence per element): launch the forward and return
        its states on the runner's device, still being computed there (to_outputs waits for them)."""
        import torch.nn.functional as F

        device = runner.device
        slots = []
        for k, size in enumerate(sizes):
            resize = any(tuple(im.shape[:2]) != tuple(size) for im in images[k])
            if len(images[k]) == 1 and not resize:
                slots.append(images[k][0][None])        # forward uploads it (pinned staging) before its graph key
                continue
            batch = torch.stack([runner.upload(im) for im in images[k]]) if len(images[k]) > 1 \
                else runner.upload(images[k][0])[None]                 # pinned staging, asynchronous
            if resize:                                  # ComfyUI's own resize (bilinear, no antialias)
                batch = F.interpolate(batch.permute(0, 3, 1, 2).float(), size=size, mode="bilinear",
                                      align_corners=False).permute(0, 2, 3, 1)
            slots.append(batch)
        with model_management.cuda_device_context(device):
            return runner.forward(input_ids.tolist(), self.image_pad_id, slots, layers)

    def _embeds(self, hidden, input_ids, prompt_span, layers, prompt, placement, sizes, spans=None) -> VLEmbeds:
        return extract.build_embeds(hidden, input_ids, self.image_pad_id, prompt_span, layers, self.num_layers,
                                    image_spans=spans, placement=placement, source=self.source, prompt=prompt,
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
        hidden = to_outputs({j_layer: cond[:, j] for j, j_layer in enumerate(layers)}, cond.device)   # owned, plain
        return self._embeds(hidden, input_ids, prompt_span, layers, prompt, placement, sizes)

    def _ids_and_span(self, raw_ids: list[int], before: str, text: str, after: str,
                      counts: list[int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Expanded ids and the prompt span, from the ids ComfyUI actually encoded."""
        ids, span, exact = layout.layout_from_ids(self.hf_tokenizer, raw_ids, before, text, after, counts,
                                                  self.image_pad_id)
        if not exact:   # ComfyUI tokenized differently (e.g. "embedding:" or "\\(" in the prompt)
            log.warning("VL Encode (native): ComfyUI's tokens differ from a plain tokenization of the chat text; "
                        "the prompt span is estimated from the template")
        return ids, span
