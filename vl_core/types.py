"""The value that flows between nodes: Qwen3-VL hidden states plus what they are made of."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import torch

Span = tuple[int, int]  # [start, end) token indices

SAFETENSORS_FORMAT = "comfyui-zimage-vl/vl-embeds"
SAFETENSORS_VERSION = 1
LAYER_WEIGHTS_KEY = "layer_weights"   # extra: {"<layer>": weight} of a weighted layer mix (vl_core.layer_mix)


@dataclass(frozen=True)
class VLEmbeds:
    """Hidden states of one Qwen3-VL pass over image(s) + prompt.

    hidden:       {layer: Tensor[B, N, D]}, layer in Hugging Face `hidden_states` numbering
                  (0 = embeddings, num_layers = final normed output), always stored non-negative.
    image_spans:  [start, end) of each image's tokens inside N.
    prompt_span:  [start, end) of the user's prompt tokens inside N (empty span if not kept).
    num_layers:   decoder depth of the source model (to show layers as negative indices).
    placement:    "after_image" | "before_image": where the prompt sat in the causal sequence.
    token_mode:   "full" | "image" | "text": which tokens of the pass were kept.
    source:       model id / file the states came from.
    image_sizes:  (height, width) in pixels of each image as the vision tower saw it.
    """

    hidden: dict[int, torch.Tensor]
    image_spans: tuple[Span, ...]
    prompt_span: Span
    num_layers: int
    placement: str = "after_image"
    token_mode: str = "full"
    source: str = ""
    prompt: str = ""
    image_sizes: tuple[tuple[int, int], ...] = ()
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.hidden:
            raise ValueError("VLEmbeds needs at least one hidden layer")
        shapes = {tuple(t.shape) for t in self.hidden.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise ValueError(f"VLEmbeds layers must all be [B, N, D] of one shape, got {sorted(shapes)}")

    @property
    def layers(self) -> list[int]:
        return sorted(self.hidden)

    @property
    def width(self) -> int:
        return next(iter(self.hidden.values())).shape[-1]

    @property
    def num_tokens(self) -> int:
        return next(iter(self.hidden.values())).shape[1]

    @property
    def num_image_tokens(self) -> int:
        return sum(e - s for s, e in self.image_spans)

    def image_mask(self) -> torch.Tensor:
        """Bool[N]: True at image tokens."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for s, e in self.image_spans:
            mask[s:e] = True
        return mask

    def layer_label(self, layer: int) -> str:
        return f"{layer - self.num_layers - 1} (#{layer})"

    def tokens(self, layer_weights: dict[int, float] | None = None) -> torch.Tensor:
        """Tensor[B, N, D]: the single stored layer, or Σ_l w_l·h_l / Σ_l w_l over stored layers (default weights:
        the stored mix in extra[LAYER_WEIGHTS_KEY], else equal)."""
        if layer_weights is None:
            layer_weights = self.stored_layer_weights()
        if layer_weights is None:
            if len(self.hidden) == 1:
                return next(iter(self.hidden.values()))
            layer_weights = {layer: 1.0 for layer in self.hidden}
        missing = [layer for layer in layer_weights if layer not in self.hidden]
        if missing:
            raise ValueError(f"layers {missing} were not encoded; stored layers are {self.layers}")
        total = sum(layer_weights.values())
        if total == 0:
            raise ValueError("layer weights sum to 0")
        out = sum(w * self.hidden[layer].float() for layer, w in layer_weights.items()) / total
        return out.to(next(iter(self.hidden.values())).dtype)

    def stored_layer_weights(self) -> dict[int, float] | None:
        """{layer: weight} of a weighted mix (VL Encode 'L:w' layers, VL Select Layers), or None (equal mix)."""
        raw = self.extra.get(LAYER_WEIGHTS_KEY)
        return None if raw is None else {int(k): float(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))}

    def with_hidden(self, hidden: dict[int, torch.Tensor], **changes) -> "VLEmbeds":
        return replace(self, hidden=hidden, **changes)

    def metadata(self) -> dict:
        """JSON-safe description (everything but the tensors)."""
        return {
            "format": SAFETENSORS_FORMAT,
            "version": SAFETENSORS_VERSION,
            "layers": self.layers,
            "image_spans": [list(s) for s in self.image_spans],
            "prompt_span": list(self.prompt_span),
            "num_layers": self.num_layers,
            "placement": self.placement,
            "token_mode": self.token_mode,
            "source": self.source,
            "prompt": self.prompt,
            "image_sizes": [list(s) for s in self.image_sizes],
            "width": self.width,
            "num_tokens": self.num_tokens,
            "extra": self.extra,
        }

    def to_safetensors(self, path: str) -> None:
        from safetensors.torch import save_file

        tensors = {f"hidden.{layer}": t.detach().cpu().contiguous() for layer, t in self.hidden.items()}
        save_file(tensors, path, metadata={"vl_embeds": json.dumps(self.metadata())})

    @classmethod
    def from_safetensors(cls, path: str, label: str | None = None) -> "VLEmbeds":
        """Load a file written by to_safetensors, every field validated (vl_core.embeds_file); ValueError
        naming the file (`label`, default the path) and the field on anything else."""
        from .embeds_file import read_embeds

        return read_embeds(path, label)
