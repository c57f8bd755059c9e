"""The OpenMP team size of torch's CPU ops on the calling thread only, for one bulk copy.

Why: the image staging copy (12 MB float32 → float16, pinned) runs on torch's OpenMP pool, one worker per core;
between encodes the workers fall asleep, and waking all of them costs more than the copy (bench/README.md).
`torch.set_num_threads` would narrow the pool for the whole process (it also resizes the pthreadpool and clears
oneDNN's primitive cache), whereas OpenMP's own `omp_set_num_threads` sets the calling thread's team size
(a per-thread control variable): other threads, and this one after the block, are untouched.

No library exposes the per-thread call, so it is reached through ctypes in the OpenMP runtime torch loaded
(found in /proc/self/maps, checked to be the one torch asks: its omp_get_max_threads equals
torch.get_num_threads). Where that fails (no /proc, another runtime, a build without OpenMP) it does nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re

import torch

_RUNTIME = re.compile(r"/lib(gomp|iomp5|omp)[\w.-]*\.so[\w.]*$")
_found: list = []        # [runtime or None], looked up once


def _runtime():
    """(omp_set_num_threads, omp_get_max_threads) of the process's OpenMP runtime, or None."""
    if _found:
        return _found[0]
    runtime = None
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if _RUNTIME.search(line.strip())}
        own_dir = os.path.dirname(torch.__file__)
        for path in sorted(paths, key=lambda p: (not p.startswith(own_dir), p)):     # torch's own copy first
            lib = ctypes.CDLL(path)            # already mapped: the same instance torch uses
            set_n, get_max = lib.omp_set_num_threads, lib.omp_get_max_threads
            set_n.argtypes, set_n.restype, get_max.restype = [ctypes.c_int], None, ctypes.c_int
            if torch.get_num_threads() == get_max():        # (torch's count first: it may set this thread's)
                runtime = (set_n, get_max)
                break
    except (OSError, AttributeError, ValueError):
        runtime = None
    _found.append(runtime)
    return runtime


@contextlib.contextmanager
def team_size(n: int | None):
    """CPU ops of torch issued by this thread inside the block use at most n OpenMP threads (n None or ≥ the
    current count: unchanged)."""
    runtime = _runtime() if n else None
    # (torch.get_num_threads first: in a thread new to torch it applies torch's own count, which its first
    # parallel op would otherwise apply inside the block, and the restore below would then undo)
    own = torch.get_num_threads() if runtime else 0
    if not runtime or n >= own or runtime[1]() != own:
        yield
        return
    runtime[0](max(1, int(n)))
    try:
        yield
    finally:
        runtime[0](own)
