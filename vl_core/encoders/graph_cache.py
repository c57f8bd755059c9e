"""CUDA graphs of repeated identical encodes, owned by one cache object (no module state).

An encode is ~1100 small kernel launches: on a GPU the forward is bound by the host launching them.
The second time an identical forward (same key: e.g. ids, image sizes, layers, weights at the same addresses)
runs, it is captured as a CUDA graph; later ones copy the new inputs into the graph's input buffers and
replay it. `release()` drops every graph and the memory pools they hold (call it when the model is
offloaded). A failed capture switches the cache off until release(): eager meanwhile.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

log = logging.getLogger("comfyui-zimage-vl")


class GraphCache:
    """Up to `capacity` captured graphs (least recently used evicted) and which keys ran eagerly once. The runner
    keeps two per encode (vision tower, language model): the default holds two encodes' graphs, the previous
    single-graph default's memory; cycling more (image size, prompt) pairs than that recaptures each time."""

    def __init__(self, capacity: int = 4, seen_capacity: int = 64):     # (the runner: two parts per encode)
        self.capacity = capacity
        self.seen_capacity = seen_capacity
        self.broken = False                       # a capture failed: none until release()
        self._graphs: OrderedDict = OrderedDict()  # key -> {"graph", "images", "outputs", "keep"}
        self._seen: dict = {}                      # key -> eager runs so far
        self._inputs: dict = {}                    # (shape, dtype, device) -> input_buffer's tensor

    def __len__(self) -> int:
        return len(self._graphs)

    def usable(self, device: torch.device) -> bool:
        """Graphs can run here: a CUDA device, no failed capture, not inside someone else's capture."""
        return not self.broken and device.type == "cuda" and not torch.cuda.is_current_stream_capturing()

    def replay(self, key: Hashable, images: Sequence[torch.Tensor], clone: bool = True) -> dict | None:
        """The outputs of the graph captured under `key` run on `images` (its inputs); None if there is none.
        clone: owned copies; False: the graph's own output buffers, valid until its next replay (for a consumer
        that copies them in stream order first, e.g. the next graph's inputs)."""
        g = self._graphs.get(key)
        if g is None:
            return None
        self._graphs.move_to_end(key)
        for buf, im in zip(g["images"], images):
            if im is not buf:
                buf.copy_(im, non_blocking=True)
        g["graph"].replay()
        return {layer: t.clone() for layer, t in g["outputs"].items()} if clone else dict(g["outputs"])

    def input_buffer(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This cache's own device buffer for one input of this shape and dtype (the same tensor every call until
        release()): written there first (e.g. by the upload's DMA), an input needs no copy into a graph captured
        over it, and every graph captured on such a buffer reads it in place."""
        key = (tuple(shape), dtype, device)
        buf = self._inputs.pop(key, None)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=device)
        self._inputs[key] = buf                         # most recently used last
        while len(self._inputs) > self.capacity:
            self._inputs.pop(next(iter(self._inputs)))
        return buf

    def ran_before(self, key: Hashable) -> bool:
        """True if `key` already ran eagerly (capture it now); otherwise counts this eager run."""
        if self._seen.get(key, 0) >= 1:
            return True
        self._seen[key] = self._seen.get(key, 0) + 1
        while len(self._seen) > self.seen_capacity:
            self._seen.pop(next(iter(self._seen)))
        return False

    def capture(self, key: Hashable, device: torch.device, forward: Callable[[list[torch.Tensor]], dict],
                images: Sequence[torch.Tensor], keep=(), cancelled: Callable[[], bool] = lambda: False,
                clone: bool = True) -> dict | None:
        """Capture forward(static images) under `key` and return its outputs, or None (then run eagerly).

        A warm-up run on a side stream first (allocator, cuBLAS, cuDNN plans); `cancelled()` after it can
        refuse the capture (e.g. a weight needed a per-call cast). `keep`: tensors the graph reads that
        must outlive it (its tables); clone: as in replay.
        """
        try:
            static = [im if self._owns(im) else im.to(device).clone() for im in images]
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                forward(static)
            torch.cuda.current_stream(device).wait_stream(stream)
            if cancelled():
                return None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = forward(static)
        except Exception as e:  # noqa: BLE001 - capture is an optimisation: fall back to eager
            self.broken = True
            log.warning("Qwen3-VL runner: CUDA graph capture failed (%s: %s); running eagerly", type(e).__name__, e)
            return None
        self._graphs.pop(key, None)               # (a recapture: most recently used, like a new one)
        self._graphs[key] = {"graph": graph, "images": static, "outputs": outputs, "keep": keep}
        while len(self._graphs) > self.capacity:
            self._graphs.popitem(last=False)
        graph.replay()
        return {layer: t.clone() for layer, t in outputs.items()} if clone else dict(outputs)

    def _owns(self, t: torch.Tensor) -> bool:
        return any(t is buf for buf in self._inputs.values())

    def release(self) -> None:
        """Drop every captured graph (and the memory pools they hold) and the eager-run counts; a failed capture
        is tried again after it (it may have been a transient out-of-memory beside another model)."""
        self._graphs.clear()
        self._seen.clear()
        self._inputs.clear()
        self.broken = False
