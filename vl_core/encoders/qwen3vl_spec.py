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


def check_modules(s: Qwen3VLSpec, v, lm) -> None:
    """Validate a Qwen3-VL `visual` + language model module layout against the spec (UnsupportedModel with the reason)."""

    def need(obj, path):
        cur = obj
        for part in path.split("."):
            if not hasattr(cur, part):
                raise UnsupportedModel(f"module has no {path!r}")
            cur = getattr(cur, part)
        return cur

    proj = need(v, "patch_embed.proj")
    cin = 3 * s.temporal_patch_size * s.patch_size ** 2
    if proj.weight.numel() != s.vision_hidden * cin:
        raise UnsupportedModel(f"patch_embed.proj has {tuple(proj.weight.shape)}, expected "
                               f"{s.vision_hidden}x{cin} elements")
    if need(v, "pos_embed.weight").shape[0] != s.num_grid_per_side ** 2:
        raise UnsupportedModel("pos_embed size does not match num_grid_per_side")
    blocks = need(v, "blocks")
    if len(blocks) != s.vision_depth:
        raise UnsupportedModel(f"{len(blocks)} vision blocks, expected {s.vision_depth}")
    for path in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2"):
        need(blocks[0], path)
    for path in ("merger.norm", "merger.linear_fc1", "merger.linear_fc2"):
        need(v, path)
    mergers = need(v, "deepstack_merger_list") if s.deepstack_indexes else []
    if len(mergers) != len(s.deepstack_indexes):
        raise UnsupportedModel("deepstack mergers do not match deepstack indexes")
    need(lm, "embed_tokens.weight")
    layers = need(lm, "layers")
    if len(layers) != s.num_layers:
        raise UnsupportedModel(f"{len(layers)} decoder layers, expected {s.num_layers}")
    for path in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        if need(layers[0], path) is None:
            raise UnsupportedModel(f"decoder layer has no {path}")
    if getattr(lm, "norm", None) is None:
        raise UnsupportedModel("language model has no final norm")
    q = layers[0].self_attn.q_proj.weight
    if tuple(q.shape) != (s.heads * s.head_dim, s.hidden):
        raise UnsupportedModel(f"q_proj is {tuple(q.shape)}, expected {(s.heads * s.head_dim, s.hidden)}")
