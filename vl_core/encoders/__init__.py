"""VL backends. Each implements the `VLEncoder` protocol over its own weights."""
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
