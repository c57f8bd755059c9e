"""Where the host time of one repeated (graph-replayed) encode goes: inclusive wall time of named functions.

Wraps the functions an encode passes through (ComfyUI's load_models_gpu, the weight check, tokenisation
layout, upload, graph key, replay, result download, VLEmbeds build) with perf_counter timers for a number of
encodes, and records the GPU time of the graph replay with CUDA events. Host parts before the replay leave
the GPU idle; `to_outputs` waits for the GPU (its time minus the GPU's remaining work is the download).
Used by bench_encode.py's `hostparts` section; timings on the CPU are meaningless.
"""
from __future__ import annotations

import contextlib
import statistics
import time


@contextlib.contextmanager
def timed_functions(targets, record: dict):
    """targets: (label, owner, attribute) triples; each call's inclusive ms is appended to record[label]."""
    saved = []
    for label, owner, attr in targets:
        original = getattr(owner, attr, None)
        if original is None:
            continue

        def wrapper(*args, _f=original, _label=label, **kwargs):
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                record.setdefault(_label, []).append(1e3 * (time.perf_counter() - t0))

        had = attr in vars(owner) if hasattr(owner, "__dict__") else True
        saved.append((owner, attr, original, had))
        setattr(owner, attr, wrapper)
    try:
        yield record
    finally:
        for owner, attr, original, had in reversed(saved):
            if had:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)


def gpu_timed_replay(graphs, record: dict):
    """Targets entry wrapping graphs.replay with CUDA events (GPU ms of each replay, in record['gpu replay <part>'],
    the part named by the key's first element; CUDA only)."""
    import torch

    original = graphs.replay
    pending = []

    def replay(key, images, **kw):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = original(key, images, **kw)
        end.record()
        pending.append((key[0] if isinstance(key, tuple) and key and isinstance(key[0], str) else "", start, end))
        return out

    def collect():
        torch.cuda.synchronize()
        for part, s, e in pending:        # one entry per graph part (the runner: vision, lm)
            record.setdefault(f"gpu replay {part}".strip(), []).append(s.elapsed_time(e))

    return replay, collect


def host_parts(encode, encoder, runner, modules: dict, reps: int = 10) -> dict:
    """Median ms per part over `reps` encodes (after two warm-up encodes so the graph is captured); the previous
    result stays alive while the next is made, as in ComfyUI's cache."""
    import torch

    cuda = torch.cuda.is_available() and runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    encode()
    encode()
    sync()
    record: dict = {}
    targets = [("encode (total)", encoder, "encode")]
    for label, (owner, attr) in modules.items():
        targets.append((label, owner, attr))
    graphs = runner.graphs if cuda else None
    if graphs is not None:
        replay, collect = gpu_timed_replay(graphs, record)
        graphs.replay = replay
    try:
        with timed_functions(targets, record):
            for _ in range(reps):
                kept = encode()     # noqa: F841 - the previous result lives until the new one is made
                sync()
    finally:
        if graphs is not None:
            del graphs.replay
            collect()
    return {label: {"median_ms": round(statistics.median(v), 3), "calls_per_encode": len(v) / reps}
            for label, v in record.items()}
