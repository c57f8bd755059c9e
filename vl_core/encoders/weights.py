"""Where the runner's weights and results live: the weight source protocol's default, device names, owned outputs."""
from __future__ import annotations

import torch

PINNED_OUTPUT_MAX_BYTES = 64 * 2 ** 20


def normalize_device(device) -> torch.device:
    """cuda → cuda:<current index> (tensors always report an index; torch.device("cuda") != "cuda:0")."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class DirectWeights:
    """The modules' own tensors, cast to (dtype, device) per use only where they differ.

    A weight source is `get(module) -> (weight, bias, token)` and `release(module, weight, bias, token)`
    (called when token is not None); `graph_safe` says a CUDA graph may capture what it reads.
    """

    graph_safe = True     # reads only the modules' tensors: a CUDA graph may capture it

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        self.device = normalize_device(device)

    def _fit(self, t):
        if t is None:
            return None
        if t.dtype != self.dtype or t.device != self.device:
            t = t.to(self.device, self.dtype, non_blocking=True)
        return t

    def get(self, module):
        return self._fit(module.weight), self._fit(getattr(module, "bias", None)), None

    def release(self, module, weight, bias, token) -> None:
        pass


def to_output(t: torch.Tensor, device) -> torch.Tensor:
    """float32 copy of a result on `device` that the caller owns (never an inference tensor). GPU → CPU goes
    through a pinned buffer (one fast DMA instead of a pageable copy) for results up to 64 MiB."""
    device = torch.device(device)
    if t.device.type == "cuda" and device.type == "cpu" and t.numel() * 4 <= PINNED_OUTPUT_MAX_BYTES:
        out = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
        out.copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return out
    out = t.to(device, torch.float32)
    if out is t or out.is_inference():
        out = out.clone()
    return out
