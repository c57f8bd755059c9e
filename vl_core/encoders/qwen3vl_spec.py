"""What the fast Qwen3-VL runner needs to know about a model: its sizes and its backend's conventions."""
from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModel(ValueError):
    """The modules do not have the layout / configuration this runner implements."""


@dataclass(frozen=True)
class Qwen3VLSpec:
    # vision tower
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    vision_hidden: int
    vision_heads: int
    vision_depth: int
    num_grid_per_side: int
    deepstack_indexes: tuple[int, ...]
    # language model
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool
    rms_eps: float
    # conventions of the backend the weights come from
    deepstack_after_record: bool      # True: ComfyUI (records layer i after DeepStack add of layer i-1)
    vision_rope_theta: float = 10000.0
    image_mean: float = 0.5
    image_std: float = 0.5

    @property
    def vision_head_dim(self) -> int:
        return self.vision_hidden // self.vision_heads
