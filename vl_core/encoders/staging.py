"""Host → device image uploads through reused pinned buffers, their CPU copies started ahead on a thread of their own.

A pageable `.to(device)` is a slower, synchronous driver-staged copy; here the CPU copies the image into
page-locked memory once and the DMA runs asynchronously. That copy (12 MB float32 → 6 MB float16 at 1024²) is
host work the GPU waits for, so an encode can start it on the staging thread (`prefetched`) before its own host
work (model checks, token layout, the graph key's weight scan); the upload then finds it done.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from .openmp import team_size
from .weights import PINNED_OUTPUT_MAX_BYTES

_POOL: list = []                 # [the staging thread's executor], made on first use
_POOL_LOCK = threading.Lock()


def _staging_thread() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(1, thread_name_prefix="zimage-vl-staging"))
        return _POOL[0]


def same_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b view the same memory as the same elements in the same order (size-1 dims aside: image vs image[None])."""
    if a.data_ptr() != b.data_ptr() or a.dtype != b.dtype or a.device != b.device or a.numel() != b.numel():
        return False
    return ([(n, s) for n, s in zip(a.shape, a.stride()) if n != 1]
            == [(n, s) for n, s in zip(b.shape, b.stride()) if n != 1])


class _Staged:
    """One CPU copy into a pinned buffer, running or done on the staging thread."""

    __slots__ = ("source", "dtype", "buf", "done")

    def __init__(self, source, dtype, buf, done):
        self.source, self.dtype, self.buf, self.done = source, dtype, buf, done


class HostStaging:
    """Uploads through reused pinned buffers: one CPU copy into page-locked memory, then an asynchronous DMA. A
    buffer is rewritten only after its previous DMA finished (an event per buffer). Tensors over `max_bytes`,
    already pinned or on the GPU go straight through `.to(device, dtype, non_blocking=True)`; CPU targets are left
    as they are. `dtype`: the dtype on the wire to a GPU (the copy into the pinned buffer converts), e.g. float16
    for images: half the DMA's bytes, and one dtype for the forward whatever the image's own. `copy_threads`: the
    OpenMP team of that copy (openmp.team_size; None: torch's whole pool): between encodes the pool sleeps, and
    waking every core costs more than a 12 MB copy needs (bench/README.md)."""

    copy_threads: int | None = 4

    def __init__(self, capacity: int = 4, max_bytes: int = PINNED_OUTPUT_MAX_BYTES):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._buffers: dict = {}      # (numel, dtype) -> (pinned buffer, event of its last DMA or None)
        self._pending: list = []      # _Staged copies started by `prefetched` blocks now open

    def _stageable(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.numel() * t.element_size() <= self.max_bytes

    def _take_buffer(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A pinned buffer of t's shape and `dtype` out of the pool, free to write (its last DMA done)."""
        hit = self._buffers.pop((t.numel(), dtype), None)
        if hit is None:
            return torch.empty(t.numel(), dtype=dtype, pin_memory=True).view(t.shape)
        buf, event = hit
        if event is not None:
            event.synchronize()        # (its previous DMA: done long before, in an encode's steady state)
        return buf.view(t.shape)

    def _fill(self, buf: torch.Tensor, t: torch.Tensor) -> None:
        with team_size(self.copy_threads):
            buf.copy_(t)

    @contextlib.contextmanager
    def prefetched(self, tensors, dtypes):
        """Inside the block, `upload(t, device, dtype)` of each CPU tensor given here (or a view of the same elements,
        e.g. t[None]) finds it already copied, or being copied, into its pinned buffer: the copies run on the staging
        thread from the block's start while the caller's host work goes on (the caller waits only for the thread to
        take the first). Copies not uploaded inside the block are dropped at its end; nested blocks share them."""
        mine, first = [], None
        for t, dtype in zip(tensors, dtypes):
            if not self._stageable(t) or self._pending_copy(t, dtype) is not None:
                continue
            buf = self._take_buffer(t, dtype)
            started = threading.Event()

            def job(buf=buf, t=t, started=started):      # (CPU work only)
                started.set()
                self._fill(buf, t)

            try:
                done = _staging_thread().submit(job)
            except RuntimeError:        # the interpreter is shutting down: the uploads copy for themselves
                self._buffers[(t.numel(), dtype)] = (buf, None)
                break
            staged = _Staged(t, dtype, buf, done)
            mine.append(staged)
            self._pending.append(staged)
            first = started if first is None else first
        if first is not None:
            # until the thread runs the job it waits for the GIL, which this thread's Python work would hold for
            # up to the interpreter's switch interval (5 ms); once in the copy it needs none
            first.wait()
        try:
            yield
        finally:
            self._pending = [p for p in self._pending if all(p is not m for m in mine)]

    def _pending_copy(self, t: torch.Tensor, dtype: torch.dtype) -> _Staged | None:
        """The open prefetch's copy of t's elements as `dtype`, if any."""
        return next((p for p in self._pending if p.dtype == dtype and same_elements(p.source, t)), None)

    def copying(self, t: torch.Tensor, dtype: torch.dtype) -> bool:
        """True while a copy of t that a `prefetched` block started is still running (its upload would wait)."""
        p = self._pending_copy(t, dtype)
        return p is not None and not p.done.done()

    def upload(self, t: torch.Tensor, device, dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """t on `device` as `dtype` (asynchronous where staged); `out`: a device tensor of that shape and dtype to DMA
        into (e.g. a CUDA graph's input buffer) instead of a new one."""
        device = torch.device(device)
        if device.type != "cuda":
            return t.to(device, non_blocking=True)
        dtype = dtype or t.dtype
        staged = self._pending_copy(t, dtype)
        if staged is not None:
            self._pending.remove(staged)
            staged.done.result()        # (re-raises the copy's error)
            buf = staged.buf
        elif not self._stageable(t) or t.is_pinned():              # (is_pinned asks the driver: last)
            return t.to(device, dtype, non_blocking=True) if out is None else out.copy_(t, non_blocking=True)
        else:
            buf = self._take_buffer(t, dtype)
            self._fill(buf, t)
        buf = buf.view(t.shape)
        result = buf.to(device, non_blocking=True) if out is None else out.copy_(buf, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._buffers[(buf.numel(), dtype)] = (buf, event)            # most recently used last
        while len(self._buffers) > self.capacity:
            self._buffers.pop(next(iter(self._buffers)))
        return result
