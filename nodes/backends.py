"""The two Qwen3-VL backends on the ComfyUI side, and the model-folder helpers of the loader node.

- NativeQwen3VLEncoder: ComfyUI's own Qwen3-VL (comfy/text_encoders/qwen3vl.py) from CLIPLoader.
- TransformersVLModel:  vl_core's TransformersQwen3VL wrapped in a ModelPatcher so ComfyUI loads/offloads it.

Both implement vl_core.encoders.VLEncoder with Hugging Face `hidden_states` layer numbering.

Known difference between them (measured on identical weights, fp32): at layers 1..K, where K is the
number of DeepStack layers (3 for Qwen3-VL-4B), the *image-token* states differ by exactly the DeepStack
vision feature: transformers records hidden_states[i] as decoder layer i-1's output before DeepStack adds
its features; ComfyUI records the input of layer i, after the addition. Text tokens, layer 0 and layers
> K agree to float rounding.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

import comfy.model_management as model_management
import comfy.model_patcher

from ..vl_core import extract
from ..vl_core.encoders.transformers_qwen3vl import (TransformersQwen3VL, check_qwen3vl_folder, expand_image_pads,
                                                    tokenize_chat)
from ..vl_core.types import VLEmbeds

log = logging.getLogger("comfyui-zimage-vl")

VL_FOLDER_KEYS = ("text_encoders", "LLM")
MAX_FOLDER_DEPTH = 3          # models/LLM/<org>/<name>/config.json is found; deeper is not
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# CLIPLoader types (nodes.py) under which comfy/sd.py loads a Qwen3-VL-4B file as the plain Qwen3VL
# class: every type except these, which build a different encoder from the same weights.
CLIPLOADER_TYPES_NOT_PLAIN_QWEN3VL_4B = ("flux2", "krea2", "mage")
NOT_QWEN3VL_HINT = ("load qwen3vl_4b with CLIPLoader type 'lumina2' or 'stable_diffusion' (any type except "
                    + ", ".join(repr(t) for t in CLIPLOADER_TYPES_NOT_PLAIN_QWEN3VL_4B)
                    + ", which load it as a different encoder), or use Load Qwen3-VL (transformers)")


def _check_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise ValueError("no layers requested")
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if bad:
        raise ValueError(f"layers {bad} are not resolved hidden-state indices in 0..{num_layers} "
                         "(resolve negative indices with vl_core.extract.resolve_layer)")
    return layers


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

    def __init__(self, clip):
        import comfy.text_encoders.qwen3vl as qwen3vl

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

    def _image_tokens(self, image: torch.Tensor) -> tuple[int, tuple[int, int]]:
        """(token count, (h, w)) ComfyUI's own preprocessing gives this image (it may resize tiny/huge ones)."""
        import comfy.text_encoders.qwen_vl as qwen_vl

        vision = self._transformer.visual
        _, grid = qwen_vl.process_qwen2vl_images(image[None], patch_size=vision.patch_size,
                                                 merge_size=vision.spatial_merge_size)
        t, gh, gw = (int(v) for v in grid[0])
        return t * gh * gw // vision.spatial_merge_size ** 2, (gh * vision.patch_size, gw * vision.patch_size)

    def encode(self, images: list[torch.Tensor], prompt: str, layers: list[int], placement: str) -> VLEmbeds:
        images = list(images)
        layers = _check_layers(layers, self.num_layers)
        before, text, after = extract.chat_pieces(prompt, len(images), placement)
        full = before + text + after
        if not full.startswith("<|im_start|>"):   # ComfyUI skips its own template (and think block) then
            raise RuntimeError("chat text must start with <|im_start|>")

        counts, sizes = [], []
        for k, image in enumerate(images):
            n, size = self._image_tokens(image)
            if size != (int(image.shape[0]), int(image.shape[1])):
                log.warning("VL Encode (native): ComfyUI resized image %d from %dx%d to %dx%d px (its Qwen-VL "
                            "preprocessing keeps 3136..12845056 pixels)", k, image.shape[1], image.shape[0],
                            size[1], size[0])
            counts.append(n)
            sizes.append(size)

        clip = self.clip.clone()
        clip.clip_layer(list(layers))
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
        hidden = {layer: cond[:, j].float().clone() for j, layer in enumerate(layers)}
        return extract.build_embeds(hidden, input_ids, self.image_pad_id, prompt_span, layers, self.num_layers,
                                    placement=placement, source=self.source, prompt=prompt,
                                    image_sizes=tuple(sizes))

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

    def encode(self, images: list[torch.Tensor], prompt: str, layers: list[int], placement: str) -> VLEmbeds:
        # full load: the HF modules have no ComfyUI weight casting, so a partial (lowvram) load cannot run
        model_management.load_models_gpu([self.patcher], force_full_load=True)
        self.encoder.output_device = model_management.intermediate_device()
        return self.encoder.encode(images, prompt, layers, placement)

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
