"""Where the host time of one repeated (graph-replayed) encode goes: inclusive wall time of named functions.

Wraps the functions an encode passes through (ComfyUI's load_models_gpu, the weight check, tokenisation
layout, upload, graph key, replay, result download, VLEmbeds build) with perf_counter timers for a number of
encodes, and records the GPU time of the graph replay with CUDA events. Host parts before the replay leave
the GPU idle; `to_outputs` waits for the GPU (its time minus the GPU's remaining work is the download).
Used by bench_encode.py's `hostparts` section (and its cold probe), with the other host-side measurements it
prints: primitive costs inside the process, the staging-copy probe, a cProfile of repeated encodes. Timings on
the CPU are meaningless.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

from common import import_pack


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


def runner_of(enc):
    """The fast runner of a native encoder or a TransformersVLModel (built, and the model loaded, on demand)."""
    if hasattr(enc, "encoder"):
        enc._load()
        return enc.encoder.fast_runner()
    return enc._runner or enc._fast_runner(1, 1, [(64, 64)])


def host_profile(name: str, fn, reps: int) -> None:
    """cProfile of `reps` repeated encodes (after two warm ones): the top functions by own time, printed."""
    import cProfile
    import io
    import pstats

    fn(), fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(28)
    print(f"\n===== host profile: {name}, {reps} encodes (ms are totals over them) =====\n{text.getvalue()}", flush=True)


def host_parts_section(native, tr, native_clip, tq, layer, g, size, reps, prompt: str) -> dict:
    """host_parts.py on both backends' graph-replayed encodes (fusion as configured for those encoders)."""
    import torch

    image = torch.rand(size, size, 3, generator=g)
    out = {"native": native_host_parts(native, native_clip, image, layer, reps, prompt)}
    runner = runner_of(tr)
    parts = {"_load (ensure_loaded)": (tr, "_load"), "fast_runner": (tr.encoder, "fast_runner"),
             "tokenize": (tr.encoder, "tokenize"), **runner_parts(runner),
             "to_outputs (waits for the GPU)": (tq, "to_outputs"), "_finish": (tr.encoder, "_finish")}
    out["transformers"] = host_parts(lambda: tr.encode([image], prompt, [layer], "after_image"), tr, runner,
                                     parts, reps)
    for backend, rows in out.items():
        for label, r in rows.items():
            print(f"host parts {backend:<12} {label:<32} {r}", flush=True)
    return out


def median_ms(fn, n: int = 50, warm: bool = True) -> float:
    """Median wall ms of n calls of fn (after one uncounted call if warm)."""
    if warm:
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return round(statistics.median(times), 4)


def process_costs(device, runner=None) -> dict:
    """Primitive host costs measured inside this process (models loaded, kernels compiled), to compare with the
    same primitives in a bare process (host_probe.py): a 700-weight address scan, find_runs, a 12 MB staged
    upload, one small CPU op."""
    import torch

    extract, weights = import_pack("vl_core.extract"), import_pack("vl_core.encoders.weights")
    params = [torch.nn.Parameter(torch.empty(64, device=device)) for _ in range(700)]
    ids = torch.tensor([5] * 20 + [7] * 1024 + [5] * 3)
    image = torch.rand(1, 1024, 1024, 3)
    staging = import_pack("vl_core.encoders.staging").HostStaging()
    small = torch.zeros(8)

    med = median_ms
    out = {"threads": torch.get_num_threads(), "scan_700": med(lambda: tuple(map(torch.Tensor.data_ptr, params))),
           "find_runs": med(lambda: extract.find_runs(ids, 7)), "upload_12MB": med(lambda: staging.upload(image, device)),
           "small_add": med(lambda: small.add(1))}
    if device.type == "cuda":       # the staging copy alone (CPU, torch's threads): float32 → float16 pinned
        wire = torch.empty(image.shape, dtype=torch.float16, pin_memory=True)
        out["copy_12MB_to_fp16_pinned"] = med(lambda: wire.copy_(image))
        out["copy_12MB_to_fp32_pinned"] = med(lambda: torch.empty(image.shape, pin_memory=True).copy_(image))

        team_size = import_pack("vl_core.encoders.openmp").team_size

        def idle_then_copy(threads: int) -> float:      # as in an encode: torch's OpenMP workers asleep by then
            times = []
            for _ in range(10):
                time.sleep(0.025)
                with team_size(threads):                # this thread's OpenMP team only (as HostStaging does)
                    t0 = time.perf_counter()
                    wire.copy_(image)
                    times.append(1e3 * (time.perf_counter() - t0))
            return round(statistics.median(times), 4)
        for n in (1, 2, 4, 8, torch.get_num_threads()):
            out[f"copy_12MB_to_fp16_after_25ms_idle_{n}_threads"] = idle_then_copy(n)
    if runner is not None and getattr(runner, "_part_slots", None):
        parts = list(runner._part_slots.values())        # the graph keys' weight slots (vision, lm)
        slots = ([d for p in parts for d in p[0]], [k for p in parts for k in p[1]])
        out["weights in the key"] = len(slots[0])
        out["model scan"] = med(lambda: weights.addresses(slots))

        def scan_after_upload():
            staging.upload(image, device)
            t0 = time.perf_counter()
            weights.addresses(slots)
            return 1e3 * (time.perf_counter() - t0)
        out["model scan after upload"] = round(statistics.median(scan_after_upload() for _ in range(50)), 4)
    return out


def runner_parts(runner) -> dict:
    """The fast runner's own parts (both backends share it)."""
    import torch

    runner_mod = sys.modules[type(runner).__module__]
    return {"runner.upload": (runner, "upload"), "staging event wait": (torch.cuda.Event, "synchronize"),
            "runner.forward": (runner, "forward"), "runner._vision_key": (runner, "_vision_key"),
            "runner._lm_key (vision graph running)": (runner, "_lm_key"),
            "weight address scan": (runner_mod, "addresses"), "CUDAGraph.replay (launch)": (torch.cuda.CUDAGraph, "replay"),
            "stream synchronize (GPU wait)": (torch.cuda.Stream, "synchronize"),
            "find_runs": (import_pack("vl_core.extract"), "find_runs"), "fusion.ops": (runner.fusion, "ops")}


def native_host_parts(native, native_clip, image, layer, reps, prompt: str) -> dict:
    """host_parts.py over one native encoder's repeated encode of `image`."""

    runner = runner_of(native)
    parts = {"ensure_loaded": (native_clip, "ensure_loaded"),
             "load_models_gpu": (native_clip.model_management, "load_models_gpu"),
             "weight check": (native_clip, "unsupported_weights"), "_chat": (native, "_chat"),
             "_sizes": (native, "_sizes"), "_layout": (native, "_layout"), "_fast_runner": (native, "_fast_runner"),
             **runner_parts(runner),
             "to_outputs (waits for the GPU)": (native_clip, "to_outputs"), "_embeds": (native, "_embeds")}
    return host_parts(lambda: native.encode([image], prompt, [layer], "after_image"), native, runner, parts, reps)


def host_copy_probe(image) -> dict:
    """Median ms of copying `image` into a pinned buffer (the staging upload's CPU part): torch's copy_ at the
    process's thread count and at 1 thread, numpy's (single-threaded memcpy), and the thread count."""
    import numpy as np
    import torch

    buf = torch.empty_like(image, pin_memory=torch.cuda.is_available())

    def med(fn):
        return median_ms(fn, 15, warm=False)

    threads = torch.get_num_threads()
    out = {"threads": threads, "interop": torch.get_num_interop_threads(), "torch_copy": med(lambda: buf.copy_(image)),
           "numpy_copy": med(lambda: np.copyto(buf.numpy(), image.numpy()))}
    torch.set_num_threads(1)
    out["torch_copy_1_thread"] = med(lambda: buf.copy_(image))
    torch.set_num_threads(threads)
    out["thread_env"] = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_")) or k.endswith("_THREADS")}
    return out
