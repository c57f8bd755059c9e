"""Backend-independent extraction: chat text, token spans, layer indices, token modes."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from .checks import require_choice
from .types import Span, VLEmbeds

PLACEMENTS = ("after_image", "before_image")
TOKEN_MODES = ("full", "image", "text")

# Qwen3 chat template as Z-Image uses it (no think block); the vision block is Qwen3-VL's.
USER_PREFIX = "<|im_start|>user\n"
ASSISTANT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


def chat_pieces(prompt: str, num_images: int, placement: str) -> tuple[str, str, str]:
    """(before_prompt, prompt, after_prompt) whose concatenation is the full chat text.

    The LM is causal: with "after_image" the prompt tokens see the image; with "before_image"
    the image tokens see the prompt (image tokens never see text placed after them).
    """
    require_choice("prompt placement", placement, PLACEMENTS)
    vision = VISION_BLOCK * num_images
    if placement == "after_image":
        return USER_PREFIX + vision, prompt, ASSISTANT_SUFFIX
    return USER_PREFIX, prompt, vision + ASSISTANT_SUFFIX


def find_runs(ids: Sequence[int] | torch.Tensor, token_id: int) -> list[Span]:
    """Contiguous [start, end) runs of `token_id` in the flattened id sequence (one run per image). Plain Python
    over the id list (one tolist): no per-op torch dispatch, which costs more than the scan on ~1000 ids."""
    seq = torch.as_tensor(ids).flatten().tolist()
    runs, start = [], 0
    for value, group in itertools.groupby(seq):
        n = len(list(group))
        if value == token_id:
            runs.append((start, start + n))
        start += n
    return runs


def resolve_layer(layer: int, num_layers: int) -> int:
    """Hugging Face `hidden_states` index in [0, num_layers]: i ≥ 0 kept, i < 0 → num_layers + 1 + i.

    -1 is the final (normed) output, -2 the second-to-last layer's output (Z-Image's text layer).
    """
    resolved = layer if layer >= 0 else num_layers + 1 + layer
    if not 0 <= resolved <= num_layers:
        raise ValueError(
            f"layer {layer} is out of range for a model with {num_layers} decoder layers: use "
            f"-{num_layers + 1}..-1 or 0..{num_layers} (-6 is the recommended default)")
    return resolved


def check_resolved_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Sorted unique layers, each already resolved into [0, num_layers] (see resolve_layer)."""
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise ValueError("no layers requested")
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if bad:
        raise ValueError(f"layers {bad} are not resolved hidden-state indices in 0..{num_layers} "
                         "(resolve negative indices with vl_core.extract.resolve_layer)")
    return layers


def parse_layers(spec: str | int | Sequence[int], num_layers: int) -> list[int]:
    """Parse "-6" / "-6,-2" / [-6, -2] into sorted unique resolved layer indices."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.replace(";", ",").split(",") if p.strip()]
        if not parts:
            raise ValueError("layers is empty: give one index such as -6, or several such as -6,-2")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"layers {spec!r} must be integers separated by commas, e.g. -6 or -6,-2") from None
    elif isinstance(spec, int):
        values = [spec]
    else:
        values = list(spec)
    return sorted({resolve_layer(v, num_layers) for v in values})


def select_tokens(embeds: VLEmbeds, mode: str) -> VLEmbeds:
    """Keep "full" (all tokens), "image" (image tokens only) or "text" (all non-image tokens)."""
    require_choice("token mode", mode, TOKEN_MODES)
    if mode == "full":
        return embeds
    image = embeds.image_mask()
    keep = image if mode == "image" else ~image
    if not bool(keep.any()):
        raise ValueError(f"token mode {mode!r} keeps no tokens of this encode "
                         f"({embeds.num_image_tokens} image tokens of {embeds.num_tokens})")
    new_index = torch.cumsum(keep.long(), 0) - 1

    def remap(span: Span) -> Span:
        s, e = span
        kept = keep[s:e].nonzero().flatten()
        if len(kept) == 0:
            return (0, 0)
        return (int(new_index[s + kept[0]]), int(new_index[s + kept[-1]]) + 1)

    hidden = {layer: t[:, keep] for layer, t in embeds.hidden.items()}
    image_spans = tuple(remap(s) for s in embeds.image_spans) if mode == "image" else ()
    return embeds.with_hidden(hidden, image_spans=image_spans, prompt_span=remap(embeds.prompt_span),
                              token_mode=mode)


def build_embeds(hidden_states: Sequence[torch.Tensor] | dict[int, torch.Tensor], input_ids: torch.Tensor,
                 image_pad_id: int, prompt_span: Span, layers: Sequence[int], num_layers: int,
                 image_spans: Sequence[Span] | None = None, **meta) -> VLEmbeds:
    """Assemble a VLEmbeds from a backend's hidden states (indexable by resolved layer) and expanded ids.

    `input_ids` has one `image_pad_id` per image token, so image spans are its runs of that id (`image_spans`:
    find_runs(input_ids, image_pad_id) already computed, e.g. while the GPU still ran the forward).
    """
    hidden = {layer: hidden_states[layer] for layer in layers}
    if image_spans is None:
        image_spans = find_runs(input_ids, image_pad_id)
    return VLEmbeds(hidden=hidden, image_spans=tuple(map(tuple, image_spans)),
                    prompt_span=tuple(prompt_span), num_layers=num_layers, **meta)


def require_finite_states(embeds: VLEmbeds, image_input: str, index: int = 0,
                          image: torch.Tensor | None = None) -> VLEmbeds:
    """Raise ValueError if the encoded states hold NaN/Inf: ¬isfinite(h).any() for any layer.

    Finite pixels far outside 0..1 (e.g. 1e30 from a bad upstream node) overflow inside the model; the
    message names the image input, the image's index and, given `image`, its pixel range.
    """
    bad = sum(int((~torch.isfinite(t)).sum()) for t in embeds.hidden.values())
    if bad:
        seen = ""
        if image is not None:
            seen = f" (its pixels span {float(image.min()):.3g}..{float(image.max()):.3g})"
        raise ValueError(
            f"input '{image_input}', image {index}{seen}: the Qwen3-VL forward gave {bad} NaN/Inf hidden-state "
            "values; the likely cause is pixel values outside [0, 1] (ComfyUI IMAGEs are 0..1 floats): check the "
            "node that produced the image, or clamp it to 0..1")
    return embeds


def token_accounting(embeds: VLEmbeds) -> list[str]:
    """One line per fact: token counts by role, layers, width, placement, source."""
    n, n_img = embeds.num_tokens, embeds.num_image_tokens
    n_prompt = embeds.prompt_span[1] - embeds.prompt_span[0]
    sizes = ", ".join(f"{w}×{h}px" for h, w in embeds.image_sizes) or "-"
    return [
        f"tokens: {n} ({embeds.token_mode})",
        f"  image: {n_img} in {len(embeds.image_spans)} span(s) {list(embeds.image_spans)}",
        f"  prompt: {n_prompt} {tuple(embeds.prompt_span)}",
        f"  template/other: {n - n_img - n_prompt}",
        f"image size seen: {sizes}",
        f"layers: {', '.join(embeds.layer_label(layer) for layer in embeds.layers)} of {embeds.num_layers}",
        f"width: {embeds.width}   batch: {next(iter(embeds.hidden.values())).shape[0]}",
        f"placement: {embeds.placement}",
        f"source: {embeds.source or '-'}",
    ]
