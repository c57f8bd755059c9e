"""Where the runner's weights and results live: the weight source protocol's default, device names, owned outputs."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import switch_interval

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


def weight_slots(modules, names=None) -> tuple[list, list]:
    """(parameter dicts, names) of the modules' registered tensors (all, or those named): a scan through them
    sees the tensor each module holds *now*, also where ComfyUI swapped in a new Parameter object (LoRA patching,
    set_attr_param), which a list of the Parameter objects themselves would miss (and keep alive)."""
    dicts, keys = [], []
    for m in modules:
        for name, p in m._parameters.items():
            if p is not None and (names is None or name in names):
                dicts.append(m._parameters)
                keys.append(name)
    return dicts, keys


def addresses(slots) -> tuple | None:
    """The data pointers of the tensors in weight_slots(...) now (C-level maps: ≈ 0.05 ms for ~700 weights
    measured alone on an H200 host, 0.2 ms inside an encode); None where a slot was emptied or holds no tensor."""
    dicts, keys = slots
    try:
        return tuple(map(torch.Tensor.data_ptr, map(dict.__getitem__, dicts, keys)))
    except (KeyError, TypeError, RuntimeError):
        return None


def joint_rows(weights) -> torch.Tensor | None:
    """One [ΣN_j, K] view W = [W₁; W₂; …] over 2-D weights that are consecutive row blocks of one storage (no
    copy), else None."""
    first = weights[0]
    if first is None or first.dim() != 2:
        return None
    ptr, storage, size = first.data_ptr(), first.untyped_storage().data_ptr(), first.element_size()
    for w in weights:
        if (w is None or w.dim() != 2 or not w.is_contiguous() or w.dtype != first.dtype or w.device != first.device
                or w.shape[1] != first.shape[1] or w.data_ptr() != ptr or w.untyped_storage().data_ptr() != storage):
            return None
        ptr += w.numel() * size
    return first.as_strided((sum(int(w.shape[0]) for w in weights), int(first.shape[1])), (int(first.shape[1]), 1))


def pack_rows(linears) -> bool:
    """Make the weights of `linears` (bias-free, plain tensors of one width, dtype and device) consecutive row
    blocks of one new tensor, each module's weight a view of it (their .data swapped: same values, same bytes in
    all); True if it packed them, False where they already are one block or cannot be."""
    ws = [getattr(m, "weight", None) for m in linears]
    if any(type(w) not in (torch.Tensor, torch.nn.Parameter) or getattr(m, "bias", None) is not None
           for m, w in zip(linears, ws)):
        return False
    if any(w.dim() != 2 or w.shape[1] != ws[0].shape[1] or w.dtype != ws[0].dtype or w.device != ws[0].device
           or w.is_meta for w in ws) or joint_rows(ws) is not None:
        return False
    with torch.no_grad():
        joint = torch.cat([w.data for w in ws])
        start = 0
        for w in ws:
            w.data = joint[start:start + w.shape[0]]
            start += w.shape[0]
    return True


def to_outputs(results: dict, device) -> dict:
    """float32 copies on `device` of the runner's results ({key: tensor}) that the caller owns: plain tensors, also
    when called under inference mode (ComfyUI runs nodes in it), so no clone is needed downstream.

    GPU → CPU (results up to 64 MiB): widened to float32 on the GPU (exact; one kernel), then one DMA each
    into a page-locked output from torch's caching host allocator, whose blocks come back when the caller drops
    a result: no first-touch page faults (≈ 1 ms per 10 MB of fresh pageable memory) and no host widening copy,
    which ran on OpenMP's pool and left its idle workers spinning into the next Python work (bench/README.md).
    The outputs are pinned CPU tensors (≤ 64 MiB each)."""
    device = torch.device(device)
    out, sources = {}, set()
    with torch.inference_mode(False):
        for k, t in results.items():
            if t.device.type == "cuda" and device.type == "cpu" and t.numel() * 4 <= PINNED_OUTPUT_MAX_BYTES:
                wide = t.to(torch.float32, memory_format=torch.contiguous_format)   # stream-ordered: safe to drop
                out[k] = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
                out[k].copy_(wide, non_blocking=True)
                sources.add(t.device)
        for source in sources:
            torch.cuda.current_stream(source).synchronize()
        for k, t in results.items():
            if k not in out:
                o = t.to(device, torch.float32)
                out[k] = o.clone() if o is t or o.is_inference() else o
    return out


class HostStaging:
    """Host → device uploads through reused pinned buffers: one CPU copy into page-locked memory, then an
    asynchronous DMA (a pageable `.to(device)` is a slower, synchronous driver-staged copy). A buffer is
    rewritten only after its previous DMA finished (an event per buffer). Tensors over `max_bytes`, already
    pinned or on the GPU go straight through `.to(device, dtype, non_blocking=True)`; CPU targets are left as they
    are. `dtype`: the dtype on the wire (the copy into the pinned buffer converts), e.g. float16 for images: half
    the DMA's bytes.

    prefetch(t) runs that CPU copy and issues the DMA on a worker thread (torch's copy releases the GIL, so the
    caller's Python work runs meanwhile; the GIL switch interval is short while a prefetch is out, so the worker
    gets the GIL back to issue the DMA within ≈ 0.1 ms instead of the default 5); the next upload(t) returns its
    result. Prefetches not uploaded are dropped by `drop_prefetched()` (their buffers with them): an entry never
    outlives the call that made it."""

    SWITCH_INTERVAL = 0.0001     # s: the interpreter's GIL switch interval while a prefetch is out

    def __init__(self, capacity: int = 4, max_bytes: int = PINNED_OUTPUT_MAX_BYTES):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._buffers: dict = {}      # (shape, dtype) -> (pinned buffer, event of its last DMA)
        self._early: dict = {}        # _tag(t, dtype) -> (t, stream, future of (buffer, device tensor, event))
        self._switch = -1             # switch_interval token while prefetches are out

    def wire_dtype(self, t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.dtype:
        """The dtype upload(t, device, dtype) returns."""
        return dtype if dtype is not None and torch.device(device).type == "cuda" else t.dtype

    def _staged(self, t: torch.Tensor, device) -> bool:
        return (torch.device(device).type == "cuda" and t.device.type == "cpu"
                and t.numel() * t.element_size() <= self.max_bytes and not t.is_pinned())    # (a driver call: last)

    @staticmethod
    def _tag(t: torch.Tensor, dtype) -> tuple:
        return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, dtype

    @staticmethod
    def _send(buf: torch.Tensor, device, stream) -> tuple:
        """(buf, its DMA to device on stream, an event after it)."""
        out = buf.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        return buf, out, event

    def _fill(self, hit, t: torch.Tensor, key: tuple, started: threading.Event | None = None) -> torch.Tensor:
        """The pinned buffer `hit` (or a new one) holding t's values in key's dtype, once its last DMA is done;
        `started` is set right before the copy (the worker's last Python step before it releases the GIL)."""
        if hit is None:
            buf = torch.empty(key[0], dtype=key[1], pin_memory=True)
        else:
            buf, event = hit
            if event is not None:
                event.synchronize()
        if started is not None:
            started.set()
        buf.copy_(t)
        return buf

    def prefetch(self, t: torch.Tensor, device, dtype: torch.dtype | None = None) -> None:
        """Start upload(t, device, dtype)'s copy and DMA on the staging thread, on the caller's current stream
        (nothing where upload would not stage)."""
        dtype = dtype or t.dtype
        tag = self._tag(t, dtype)
        if tag in self._early or not self._staged(t, device):
            return
        device = torch.device(device)
        key, stream = (tuple(t.shape), dtype), torch.cuda.current_stream(device)
        hit = self._buffers.pop(key, None)
        if hit is not None and hit[1] is not None and hit[1].query():
            hit = (hit[0], None)        # its last DMA is done: the worker goes straight to the copy
        started = threading.Event()

        def fill_and_send():
            torch.cuda.set_stream(stream)
            buf = self._fill(hit, t, key, started)
            return self._send(buf, device, stream)

        if not self._early:
            self._switch = switch_interval.lower(self.SWITCH_INTERVAL)
        future = _staging_thread().submit(fill_and_send)
        self._early[tag] = (t, stream, future)
        started.wait()          # hand the GIL over until the copy is under way (else it waits for our next release)

    def drop_prefetched(self) -> None:
        """Forget prefetches no upload took (e.g. the encode went another way)."""
        self._early.clear()
        switch_interval.restore(self._switch)

    def upload(self, t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
        device = torch.device(device)
        early = self._early.pop(self._tag(t, dtype or t.dtype), None) if self._early else None
        if early is None and not self._staged(t, device):
            return t.to(device, self.wire_dtype(t, device, dtype), non_blocking=True)
        dtype = dtype or t.dtype
        key, stream = (tuple(t.shape), dtype), torch.cuda.current_stream(device)
        if early is None:
            buf, out, event = self._send(self._fill(self._buffers.pop(key, None), t, key), device, stream)
        else:
            if not self._early:
                switch_interval.restore(self._switch)
            buf, out, event = early[2].result()
            if early[1] != stream:      # prefetched under another current stream: order this one after it
                stream.wait_event(event)
                out.record_stream(stream)
        self._buffers[key] = (buf, event)            # most recently used last
        while len(self._buffers) > self.capacity:
            self._buffers.pop(next(iter(self._buffers)))
        return out


_STAGING_THREAD: list = []


def _staging_thread():
    """The process's one staging worker (a persistent thread: its OpenMP team for torch's parallel copy is made once)."""
    if not _STAGING_THREAD:
        _STAGING_THREAD.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-vl-staging"))
    return _STAGING_THREAD[0]
