"""Qwen3-VL backend over Hugging Face `transformers` (no ComfyUI imports).

Runs `Qwen3VLForConditionalGeneration`'s inner model only up to the deepest requested layer: forward
hooks on the decoder layers record the requested states and stop the layer loop early by raising a
private exception; the final norm runs only when layer L is requested and logits are never computed.

Layer numbering is Hugging Face's `output_hidden_states`: 0 = the decoder's input embeddings (image
features merged in), i in 1..L-1 = the output of decoder layer i-1 as HF records it, L = the final
normed output. Note HF records layer outputs *before* DeepStack adds the vision features of the first
len(deepstack_visual_indexes) layers at the image positions (ComfyUI's native encoder records them
after; see nodes/native_clip.py).

Two engines:
- "fast" (default where the model's layout is the known one): vl_core.encoders.qwen3vl_runner runs the
  HF modules' weights in its own loop: weight dtype, one SDPA call per layer, no host/device syncs,
  same-size images batched (`encode_many`). Matches the HF forward to float rounding (fp32: ~1e-6).
- "hf": the HF forward itself, stopped early by hooks; the states are exactly (bit for bit) what the
  full HF forward returns with `output_hidden_states=True`. Used where the fast engine does not apply.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from .. import extract, layout, preprocess
from ..checks import require_choice
from ..types import VLEmbeds
from .batching import length_batches, same_size_batches, text_rows_forward
from .graph_cache import GraphCache
from .hf_folder import (QWEN3VL_MODEL_TYPE, check_qwen3vl_folder, check_safetensors_weights,
                        require_transformers_for_backend)
from .qwen3vl_runner import Qwen3VLRunner, prefetch
from .qwen3vl_spec import Qwen3VLSpec, UnsupportedModel
from .weights import to_outputs

log = logging.getLogger("comfyui-zimage-vl")

ENGINES = ("auto", "fast", "hf")


class _StopForward(Exception):
    """Raised from a decoder-layer hook once the deepest requested state is recorded."""


def _cfg(config, name, default=None):
    value = getattr(config, name, None)
    return default if value is None else value


def spec_from_hf_config(config) -> Qwen3VLSpec:
    """The runner spec of a transformers Qwen3VLConfig; UnsupportedModel where it differs from Qwen3-VL."""
    v, t = config.vision_config, config.text_config
    if _cfg(v, "hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UnsupportedModel(f"vision hidden_act {v.hidden_act!r} (runner implements gelu_pytorch_tanh)")
    if _cfg(t, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"text hidden_act {t.hidden_act!r} (runner implements silu)")
    rope = dict(_cfg(t, "rope_parameters", None) or _cfg(t, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise UnsupportedModel(f"text rope_type {rope.get('rope_type')!r}")
    theta = rope.get("rope_theta", _cfg(t, "rope_theta"))
    if theta is None:
        raise UnsupportedModel("text config has no rope_theta")
    vrope = dict(_cfg(v, "rope_parameters", None) or {})
    heads = int(t.num_attention_heads)
    return Qwen3VLSpec(
        patch_size=int(v.patch_size), temporal_patch_size=int(v.temporal_patch_size),
        merge_size=int(v.spatial_merge_size), vision_hidden=int(v.hidden_size), vision_heads=int(v.num_heads),
        vision_depth=int(v.depth), num_grid_per_side=int(int(v.num_position_embeddings) ** 0.5),
        deepstack_indexes=tuple(int(i) for i in _cfg(v, "deepstack_visual_indexes", [])),
        num_layers=int(t.num_hidden_layers), hidden=int(t.hidden_size), heads=heads,
        kv_heads=int(_cfg(t, "num_key_value_heads", heads)),
        head_dim=int(_cfg(t, "head_dim", int(t.hidden_size) // heads)), rope_theta=float(theta),
        mrope_section=tuple(int(x) for x in rope.get("mrope_section", (24, 20, 20))),
        mrope_interleaved=True,        # Qwen3VLTextRotaryEmbedding always interleaves
        rms_eps=float(_cfg(t, "rms_norm_eps", 1e-6)), deepstack_after_record=False,
        vision_rope_theta=float(vrope.get("rope_theta", 10000.0)))


def _require_picture(k: int, image) -> None:
    if not torch.is_tensor(image) or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image {k} must be [H, W, 3] (use vl_core.preprocess.check_image), "
                         f"got {tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")


class TransformersQwen3VL:
    """`VLEncoder` over a `transformers` Qwen3VLForConditionalGeneration and its tokenizer.

    `model` is the nn.Module (wrap it in a ComfyUI ModelPatcher to have ComfyUI move it); encode() runs
    on whatever device its parameters are on at call time. Returned states are float32 on
    `output_device` (CPU by default).
    """

    def __init__(self, model, tokenizer, source: str = "", output_device: torch.device | str = "cpu",
                 engine: str = "auto", graphs: bool = True):
        require_choice("engine", engine, ENGINES)
        require_transformers_for_backend()
        self.engine = engine
        self.graphs = GraphCache() if graphs else None   # CUDA graph replay of repeated identical encodes (GPU)
        self._runner: Qwen3VLRunner | None = None
        self._fast_error: str | None = None
        config = model.config
        if getattr(config, "model_type", None) != QWEN3VL_MODEL_TYPE:
            raise ValueError(f"model is not Qwen3-VL (config.model_type {getattr(config, 'model_type', None)!r})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._layouts: dict = {}      # (prompt, placement, image tokens) -> chat_layout(...): a memo
        self.source = source
        self.output_device = torch.device(output_device)
        text, vision = config.text_config, config.vision_config
        self.num_layers = int(text.num_hidden_layers)
        self.width = int(text.hidden_size)
        self.patch_size = int(vision.patch_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        self.merge_size = int(vision.spatial_merge_size)
        self.image_pad_id = self._token_id(extract.IMAGE_PAD)
        if self.image_pad_id != config.image_token_id:
            raise ValueError(f"tokenizer maps {extract.IMAGE_PAD} to {self.image_pad_id} but the model config's "
                             f"image_token_id is {config.image_token_id}: tokenizer and model do not belong together")

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", engine: str = "auto") -> "TransformersQwen3VL":
        """Load a local Hugging Face Qwen3-VL folder offline (no remote code, SDPA attention).

        dtype None keeps the checkpoint's dtype. Refuses (ValueError) a missing folder, one whose
        config.json is not model_type "qwen3_vl", and one without .safetensors weights (safetensors only).
        """
        from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

        path = check_qwen3vl_folder(path)
        check_safetensors_weights(path)
        name = os.path.basename(os.path.normpath(path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"folder {name!r}: cannot load its tokenizer ({e}); the folder needs the tokenizer "
                             "files (tokenizer.json or vocab.json + merges.txt)") from e
        try:
            model = Qwen3VLForConditionalGeneration.from_pretrained(
                path, dtype=dtype if dtype is not None else "auto", local_files_only=True, use_safetensors=True,
                attn_implementation="sdpa")
        except OSError as e:
            raise ValueError(f"folder {name!r}: cannot load the Qwen3-VL weights ({e})") from e
        model.to(device)
        return cls(model, tokenizer, source=name, engine=engine)

    # ------------------------------------------------------------------ helpers

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"tokenizer does not know {token} as a single special token (got ids {ids})")
        return int(ids[0])

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompt: str, num_images: int, placement: str,
                 image_tokens: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(expanded ids [N] with image_tokens[k] pad ids for image k, prompt span in them)."""
        if len(image_tokens) != num_images:
            raise ValueError(f"{len(image_tokens)} image token counts for {num_images} image(s)")
        return layout.memoized(self._layouts, (prompt, placement, tuple(image_tokens)), lambda: layout.chat_layout(
            self.tokenizer, prompt, placement, self.image_pad_id, image_tokens))

    # ------------------------------------------------------------------ fast engine

    def fast_runner(self) -> Qwen3VLRunner | None:
        """The runner over this model's modules at their current dtype/device; None (reason logged once)
        where the fast engine does not apply, or raises with engine="fast"."""
        if self.engine == "hf":
            return None
        if self._fast_error is None and self._runner is None:
            try:
                spec = spec_from_hf_config(self.model.config)
                inner = self.model.model
                runner = Qwen3VLRunner(inner.visual, inner.language_model, spec, torch.float32, "cpu",
                                       graphs=self.graphs)
                runner.check()
                self._runner = runner
            except (UnsupportedModel, AttributeError) as e:
                self._fast_error = str(e)
                log.warning("Qwen3-VL (transformers): fast encode does not apply (%s); using the transformers "
                            "forward", e)
        if self._runner is None:
            if self.engine == "fast":
                raise RuntimeError(f"engine 'fast' does not apply to this model: {self._fast_error}")
            return None
        param = self.model.model.language_model.embed_tokens.weight
        if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        runner = self._runner
        if (runner.dtype, runner.device) != (param.dtype, param.device):
            runner.dtype, runner.device = param.dtype, param.device
            runner.weights.dtype, runner.weights.device = param.dtype, param.device
        return runner

    def _check_images(self, images: Sequence[torch.Tensor]) -> None:
        for k, image in enumerate(images):
            _require_picture(k, image)
            unit = self.patch_size * self.merge_size
            if image.shape[0] % unit or image.shape[1] % unit:
                raise ValueError(f"image size {image.shape[1]}×{image.shape[0]} must be a multiple of {unit} px")

    def _image_tokens(self, images: Sequence[torch.Tensor]) -> list[int]:
        return [preprocess.image_tokens(im.shape[0], im.shape[1], self.patch_size, self.merge_size) for im in images]

    def release_graphs(self) -> None:
        """Drop this encoder's captured CUDA graphs (their memory pools with them)."""
        if self.graphs is not None:
            self.graphs.release()

    def _patches(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not images:
            return None, None
        pixels, grids = [], []
        for k, image in enumerate(images):
            _require_picture(k, image)
            pv, grid = preprocess.to_patches(image, self.patch_size, self.temporal_patch_size, self.merge_size)
            pixels.append(pv)
            grids.append(grid)
        return torch.cat(pixels), torch.cat(grids)

    def hidden_states(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                      grid_thw: torch.Tensor | None, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """{layer: [1, N, D]} for the requested resolved layers, running the LM no deeper than needed."""
        layers = extract.check_resolved_layers(layers, self.num_layers)
        deepest, wanted, L = layers[-1], set(layers), self.num_layers
        decoder_layers = self.language_model.layers
        captured: dict[int, torch.Tensor] = {}
        handles = []

        def pre_hook_0(module, args, kwargs):
            captured[0] = args[0] if args else kwargs["hidden_states"]
            if deepest == 0:
                raise _StopForward

        def make_hook(index: int):  # hidden_states[index] = output of decoder layer index-1
            def hook(module, args, output):
                if index in wanted:   # a copy: transformers 4.x's DeepStack then adds to the output in place
                    captured[index] = (output[0] if isinstance(output, tuple) else output).clone()
                if index == deepest:
                    raise _StopForward
            return hook

        device = self.device
        kwargs = dict(input_ids=input_ids.view(1, -1).to(device), use_cache=False)
        if pixel_values is not None:
            kwargs.update(pixel_values=pixel_values.to(device), image_grid_thw=grid_thw.to(device),
                          mm_token_type_ids=(input_ids == self.image_pad_id).view(1, -1).int().to(device))
        try:
            if 0 in wanted:
                handles.append(decoder_layers[0].register_forward_pre_hook(pre_hook_0, with_kwargs=True))
            for index in sorted(wanted | {deepest}):
                if 1 <= index <= L - 1:
                    handles.append(decoder_layers[index - 1].register_forward_hook(make_hook(index)))
            with torch.inference_mode():
                try:
                    out = self.model.model(**kwargs)
                    captured[L] = out.last_hidden_state
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        missing = wanted - captured.keys()
        if missing:
            raise RuntimeError(f"layers {sorted(missing)} were not captured (model structure changed?)")
        return {layer: captured[layer] for layer in layers}

    # ------------------------------------------------------------------ protocol

    def _finish(self, hidden: dict[int, torch.Tensor], input_ids, prompt_span, prompt: str, placement: str,
                 images: Sequence[torch.Tensor]) -> VLEmbeds:
        spans = extract.find_runs(input_ids, self.image_pad_id)     # host work while the GPU may still run
        # plain float32 tensors of their own (also under inference mode): downstream code may modify them in place
        hidden = to_outputs(hidden, self.output_device)
        return extract.build_embeds(
            hidden, input_ids, self.image_pad_id, prompt_span, sorted(hidden), self.num_layers, image_spans=spans,
            placement=placement, source=self.source, prompt=prompt,
            image_sizes=tuple((int(im.shape[0]), int(im.shape[1])) for im in images))

    def encode(self, images: list[torch.Tensor], prompt: str, layers: list[int], placement: str) -> VLEmbeds:
        images = list(images)
        with prefetch(self._runner, images):     # the images' staging copies beside the host work up to the forward
            runner = self.fast_runner()
            if runner is not None:
                self._check_images(images)
                layers = extract.check_resolved_layers(layers, self.num_layers)
                input_ids, prompt_span = self.tokenize(prompt, len(images), placement, self._image_tokens(images))
                hidden = runner.forward(input_ids.tolist(), self.image_pad_id, [im[None] for im in images], layers)
                return self._finish(hidden, input_ids, prompt_span, prompt, placement, images)
        return self._encode_hf(images, prompt, layers, placement)

    def encode_many(self, images: Sequence[torch.Tensor], prompt: str, layers: list[int], placement: str,
                    max_batch_tokens: int = 65536) -> list[VLEmbeds]:
        """One VLEmbeds per image (each encoded alone with the prompt, as encode([image], ...) would);
        same-size images run through the vision tower and the LM as one batch (chunks of at most
        max_batch_tokens vision patches)."""
        images = list(images)
        runner = self.fast_runner()
        if runner is None:
            return [self._encode_hf([im], prompt, layers, placement) for im in images]
        self._check_images(images)
        layers = extract.check_resolved_layers(layers, self.num_layers)
        results: list[VLEmbeds | None] = [None] * len(images)
        for group, chunks in same_size_batches(images, lambda h, w: (h // self.patch_size) * (w // self.patch_size),
                                               max_batch_tokens):
            input_ids, prompt_span = self.tokenize(prompt, 1, placement, self._image_tokens([images[group[0]]]))
            for chunk in chunks:
                batch = torch.stack([images[i] for i in chunk])
                hidden = runner.forward(input_ids.tolist(), self.image_pad_id, [batch], layers)
                for row, i in enumerate(chunk):
                    results[i] = self._finish({layer: t[row:row + 1] for layer, t in hidden.items()}, input_ids,
                                              prompt_span, prompt, placement, [images[i]])
        return results

    def text_ids(self, prompt: str, placement: str = "after_image") -> list[int]:
        """The ids encode([], prompt, ..., placement) runs."""
        return self.tokenize(prompt, 0, placement, [])[0].tolist()

    def encode_texts(self, prompts: Sequence[str], layers: list[int], placement: str = "after_image",
                     max_batch_tokens: int = 16384) -> list[VLEmbeds]:
        """One VLEmbeds per text-only prompt (= encode([], prompt, ...)); prompts of any lengths run right-padded
        through one forward per batch of at most max_batch_tokens padded tokens (batching.text_rows_forward)."""
        prompts = list(prompts)
        runner = self.fast_runner()
        if runner is None:
            return [self._encode_hf([], p, layers, placement) for p in prompts]
        layers = extract.check_resolved_layers(layers, self.num_layers)
        layouts = [self.tokenize(p, 0, placement, []) for p in prompts]
        results: list[VLEmbeds | None] = [None] * len(prompts)
        for batch in length_batches([int(ids.numel()) for ids, _ in layouts], max_batch_tokens):
            hidden = text_rows_forward(runner, [layouts[i][0].tolist() for i in batch], self.image_pad_id, layers)
            for row, i in enumerate(batch):
                ids, span = layouts[i]
                results[i] = self._finish({layer: t[row:row + 1, :ids.numel()] for layer, t in hidden.items()}, ids,
                                          span, prompts[i], placement, [])
        return results

    def _encode_hf(self, images: list[torch.Tensor], prompt: str, layers: list[int], placement: str) -> VLEmbeds:
        pixel_values, grid_thw = self._patches(images)
        input_ids, prompt_span = self.tokenize(prompt, len(images), placement, self._image_tokens(images))
        hidden = self.hidden_states(input_ids, pixel_values, grid_thw, layers)
        return self._finish(hidden, input_ids, prompt_span, prompt, placement, images)
