"""Where one repeated encode's wall time goes on the GPU's own clock: a torch.profiler (Kineto) trace of a few
encodes, cut per encode, gives the image upload's DMA, the GPU idle time before the first kernel, the graph's
span, the result download, and the GPU idle time in all (= host work the GPU waits for).

Host costs are inflated by the profiler's own op recording (≈ 1–2 µs per op); the GPU-side spans (DMA and
kernel times) are the hardware's. Used by bench_encode.py's `timeline` section (CUDA only).
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

MARK = "bench.encode"


def _spans(events: list[dict]) -> dict:
    """One encode's GPU/host spans (µs) from the trace events inside its record_function window."""
    window = next(e for e in events if e.get("name") == MARK and e.get("cat") == "user_annotation")
    t0, t1 = window["ts"], window["ts"] + window["dur"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                  and t0 <= e["ts"] <= t1 + 50_000), key=lambda e: e["ts"])
    h2d = [e for e in gpu if e["cat"] == "gpu_memcpy" and "HtoD" in e["name"]]
    d2h = [e for e in gpu if e["cat"] == "gpu_memcpy" and "DtoH" in e["name"]]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    busy, end = 0.0, t0             # union of GPU activity (overlapping copies and kernels counted once)
    for e in gpu:
        a, b = max(e["ts"], end), e["ts"] + e["dur"]
        if b > a:
            busy, end = busy + (b - a), b
    first_kernel = kernels[0]["ts"] if kernels else t1
    return {"wall": t1 - t0, "gpu busy": busy, "gpu idle": (t1 - t0) - busy,
            "host before the first GPU work": (gpu[0]["ts"] if gpu else t1) - t0,
            "upload DMA (H2D, GPU)": sum(e["dur"] for e in h2d),
            "upload bytes": sum(e.get("args", {}).get("bytes", 0) for e in h2d),
            "upload GB/s": (sum(e.get("args", {}).get("bytes", 0) for e in h2d)
                            / max(1e-9, sum(e["dur"] for e in h2d)) / 1e3),
            "H2D end → first kernel": first_kernel - (h2d[-1]["ts"] + h2d[-1]["dur"]) if h2d else None,
            "kernels span": (kernels[-1]["ts"] + kernels[-1]["dur"] - first_kernel) if kernels else 0,
            "kernels": len(kernels), "memsets": sum(e["cat"] == "gpu_memset" for e in gpu),
            "download DMA (D2H, GPU)": sum(e["dur"] for e in d2h),
            "last GPU work → encode returns": t1 - end}


def encode_timeline(encode, reps: int = 5, trace_out: str | None = None, make=None) -> dict:
    """Median µs of each span over `reps` encodes (after two warm ones; the previous result kept alive);
    trace_out: where to keep the Chrome trace; make: encode(make()) instead, make() outside the encode's window."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    call = encode if make is None else (lambda: encode(make()))
    kept = call()
    kept = call()
    torch.cuda.synchronize()
    path = Path(trace_out) if trace_out else Path(tempfile.mkdtemp()) / "encode_trace.json"
    per = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            arg = make() if make is not None else None
            with record_function(MARK):
                kept = encode() if make is None else encode(arg)     # noqa: F841 - ComfyUI's cache keeps the
            torch.cuda.synchronize()                                  # previous output while making the next
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    marks = sorted((e for e in events if e.get("name") == MARK and e.get("ph") == "X"
                    and e.get("cat") == "user_annotation"), key=lambda e: e["ts"])     # not its GPU-side twin
    for i, m in enumerate(marks):
        nxt = marks[i + 1]["ts"] if i + 1 < len(marks) else float("inf")
        per.append(_spans([m] + [e for e in events if e.get("ph") == "X" and m["ts"] <= e.get("ts", -1) < nxt
                                 and e.get("cat") != "gpu_user_annotation" and e is not m]))
    out = {}
    for key in per[0]:
        vals = [p[key] for p in per if p[key] is not None]
        out[key] = round(statistics.median(vals), 1) if vals else None
    out["trace"] = str(path)
    return out
