"""VL backends. Each implements the `VLEncoder` protocol over its own weights.

transformers_qwen3vl.py: the transformers backend (no ComfyUI). The fast runner both backends use:
qwen3vl_spec.py (sizes, conventions), qwen3vl_tables.py (RoPE / vision tables), weights.py (weight
sources, owned outputs), graph_cache.py (CUDA graphs, released explicitly), batching.py (same-size
batches, activation estimate), qwen3vl_runner.py (the forward). Token layout: vl_core/layout.py.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..types import VLEmbeds


class VLEncoder(Protocol):
    source: str        # model id / path, recorded in VLEmbeds.source
    num_layers: int    # decoder depth (hidden_states has num_layers + 1 entries)
    width: int         # hidden size D

    def encode(self, images: list[torch.Tensor], prompt: str, layers: list[int], placement: str) -> VLEmbeds:
        """images: [H, W, 3] float 0..1, already sized to multiples of 32 px (vl_core.preprocess);
        layers: resolved hidden_states indices (vl_core.extract.resolve_layer); returns all tokens
        (token_mode "full") of the chat text built by vl_core.extract.chat_pieces."""
        ...
