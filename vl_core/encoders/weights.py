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


class HostStaging:
    """Host → device uploads through reused pinned buffers: one CPU copy into page-locked memory, then an
    asynchronous DMA (a pageable `.to(device)` is a slower, synchronous driver-staged copy). A buffer is
    rewritten only after its previous DMA finished (an event per buffer). Tensors over `max_bytes`, already
    pinned, or not CPU → CUDA go straight through `.to(device, non_blocking=True)`."""

    def __init__(self, capacity: int = 4, max_bytes: int = PINNED_OUTPUT_MAX_BYTES):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._buffers: dict = {}      # (shape, dtype) -> (pinned buffer, event of its last DMA)

    def upload(self, t: torch.Tensor, device) -> torch.Tensor:
        device = torch.device(device)
        if (device.type != "cuda" or t.device.type != "cpu" or t.is_pinned()
                or t.numel() * t.element_size() > self.max_bytes):
            return t.to(device, non_blocking=True)
        key = (tuple(t.shape), t.dtype)
        hit = self._buffers.pop(key, None)
        if hit is None:
            buf, event = torch.empty(t.shape, dtype=t.dtype, pin_memory=True), None
        else:
            buf, event = hit
            if event is not None:
                event.synchronize()
        buf.copy_(t)
        out = buf.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._buffers[key] = (buf, event)            # most recently used last
        while len(self._buffers) > self.capacity:
            self._buffers.pop(next(iter(self._buffers)))
        return out
