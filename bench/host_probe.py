"""Host-side costs around one replayed encode, measured alone: CUDA graph launch (one graph or segments), the
result download and widening to float32, and the weight-address scan of the graph key. GPU only.

    python3 bench/host_probe.py [--kernels 1100] [--reps 20] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def launch(kernels: int, segments: int, reps: int, memsets: bool) -> dict:
    """A chain of `kernels` small GEMMs (≈ 18 µs each) captured as `segments` graphs: the host time of the
    launch calls, the wall time launch → done, and the GPU time between two events around it."""
    dev = torch.device("cuda")
    x = torch.randn(1047, 2560, device=dev, dtype=torch.bfloat16)
    w = torch.randn(2560, 2560, device=dev, dtype=torch.bfloat16) * 0.02
    z = torch.empty(1 << 16, device=dev)
    graphs = []
    per = kernels // segments
    for _ in range(segments):
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            torch.mm(x, w)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            y = x
            for i in range(per):
                y = torch.mm(y, w)
                if memsets:
                    z.zero_()
        graphs.append(g)
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    host, wall, gpu = [], [], []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a.record()
        for g in graphs:
            g.replay()
        t1 = time.perf_counter()
        b.record()
        b.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
        gpu.append(a.elapsed_time(b))
    return {"launch_host_ms": statistics.median(host), "wall_ms": statistics.median(wall),
            "gpu_ms": statistics.median(gpu)}


def download(reps: int, shape=(1, 1047, 2560)) -> dict:
    dev = torch.device("cuda")
    t = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    kept = []

    def bf16_then_float(keep: bool):
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        out = staged.float()
        if keep:
            kept.append(out)

    def float_on_gpu():
        staged = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
        staged.copy_(t, non_blocking=True)        # widening inside the copy kernel? (bf16 device → fp32 pinned)
        torch.cuda.current_stream().synchronize()
        out = torch.empty(t.shape, dtype=torch.float32)
        out.copy_(staged)
        kept.append(out)

    def bf16_into_empty():
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        out = torch.empty(t.shape, dtype=torch.float32)
        out.copy_(staged)
        kept.append(out)

    def sync_only():
        torch.cuda.current_stream().synchronize()

    r = {"threads": torch.get_num_threads(),
         "sync only": median_ms(sync_only, reps),
         "bf16 DMA + .float(), dropped": median_ms(lambda: bf16_then_float(False), reps),
         "bf16 DMA + .float(), kept": median_ms(lambda: bf16_then_float(True), reps)}
    kept.clear()
    r["bf16 DMA + copy_ into empty fp32, kept"] = median_ms(bf16_into_empty, reps)
    kept.clear()
    r["fp32 pinned (widened in the copy) + copy_, kept"] = median_ms(float_on_gpu, reps)
    kept.clear()
    old = torch.get_num_threads()
    for n in (1, 4):
        torch.set_num_threads(n)
        r[f"bf16 DMA + .float(), kept, {n} threads"] = median_ms(lambda: bf16_then_float(True), reps)
        kept.clear()
    torch.set_num_threads(old)
    return r


def outputs_after_gpu_work(reps: int, shape=(1, 1047, 2560)) -> dict:
    """weights.to_outputs on a result whose GPU work is still running (a 5 ms spin kernel first): its wall time
    minus the spin is the host work left after the GPU finished; and on an idle GPU. Results kept."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vl_core.encoders.weights import to_outputs

    t = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    kept = []
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(10_000_000)
    b.record()
    b.synchronize()
    cycles = int(10_000_000 * 5.0 / a.elapsed_time(b))      # a 5 ms spin

    def busy():
        torch.cuda._sleep(cycles)
        kept.append(to_outputs({0: t}, "cpu"))

    def idle():
        kept.append(to_outputs({0: t}, "cpu"))
    return {"busy GPU (5 ms spin): wall - 5 ms": median_ms(busy, reps) - 5.0, "idle GPU": median_ms(idle, reps)}


def after_parallel_copy(reps: int) -> dict:
    """A 700-weight address scan alone, and right after a 12 MB multi-threaded CPU copy (the image staging copy),
    at the process's thread count and at 4 threads: idle worker threads spinning after a parallel op slow down the
    main thread where the CPU quota is tight. With the CPU quota and affinity of this process."""
    import os

    ps = [torch.nn.Parameter(torch.empty(64, device="cuda")) for _ in range(700)]
    src, dst = torch.rand(1024, 1024, 3), torch.empty(1024, 1024, 3, pin_memory=True)

    def scan_only():
        return tuple(map(torch.Tensor.data_ptr, ps))

    def timed_after_copy():
        dst.copy_(src)
        t = time.perf_counter()
        scan_only()
        return (time.perf_counter() - t) * 1e3

    out = {"affinity": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    try:
        out["cpu.max"] = open("/sys/fs/cgroup/cpu.max").read().strip()
    except OSError:
        out["cpu.max"] = None
    out["scan alone"] = median_ms(scan_only, reps)
    out["scan after copy"] = statistics.median(timed_after_copy() for _ in range(reps))
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    out["scan after copy, 4 threads"] = statistics.median(timed_after_copy() for _ in range(reps))
    torch.set_num_threads(old)
    return out


def registered_transfers(reps: int) -> dict:
    """Page-locking in place (cudaHostRegister) instead of copying through a pinned staging buffer: the cost of
    registering / unregistering an existing 12 MB image and a fresh 10.7 MB output, and a 700-weight scan after
    each way of moving the data (a CPU copy streams it through the caches the Python objects live in)."""
    cudart = torch.cuda.cudart()
    ps = [torch.nn.Parameter(torch.empty(64, device="cuda")) for _ in range(700)]
    image = torch.rand(1024, 1024, 3)
    dev_image = torch.empty(1024, 1024, 3, device="cuda")
    staging = torch.empty(1024, 1024, 3, pin_memory=True)
    result = torch.randn(1, 1047, 2560, device="cuda")
    out = {}

    def reg(t):
        assert int(cudart.cudaHostRegister(t.data_ptr(), t.nbytes, 0)) == 0

    def unreg(t):
        assert int(cudart.cudaHostUnregister(t.data_ptr())) == 0

    def ms(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def scan_ms():
        return ms(lambda: tuple(map(torch.Tensor.data_ptr, ps)))

    times = {k: [] for k in ("register 12 MB image", "unregister 12 MB image", "register fresh 10.7 MB",
                             "unregister 10.7 MB", "scan after staged upload", "scan after registered upload",
                             "scan after registered download", "scan after staged download + widening")}
    kept = []
    for _ in range(reps):
        times["register 12 MB image"].append(ms(lambda: reg(image)))
        dev_image.copy_(image, non_blocking=True)
        times["scan after registered upload"].append(scan_ms())
        torch.cuda.synchronize()
        times["unregister 12 MB image"].append(ms(lambda: unreg(image)))
        staging.copy_(image)
        dev_image.copy_(staging, non_blocking=True)
        times["scan after staged upload"].append(scan_ms())
        torch.cuda.synchronize()
        o = torch.empty(result.shape)
        times["register fresh 10.7 MB"].append(ms(lambda: reg(o)))
        o.copy_(result, non_blocking=True)
        torch.cuda.synchronize()
        times["scan after registered download"].append(scan_ms())
        times["unregister 10.7 MB"].append(ms(lambda: unreg(o)))
        kept.append(o)
        b = torch.empty(result.shape, dtype=torch.bfloat16, pin_memory=True)
        b.copy_(result, non_blocking=True)
        torch.cuda.synchronize()
        w = torch.empty(result.shape)
        w.copy_(b)
        times["scan after staged download + widening"].append(scan_ms())
        kept.append(w)
    for k, v in times.items():
        out[k] = statistics.median(v)
    return out


def scan(reps: int) -> dict:
    ps = [torch.nn.Parameter(torch.empty(64, device="cuda")) for _ in range(700)]
    return {"700 Parameter.data_ptr": median_ms(lambda: tuple(map(torch.Tensor.data_ptr, ps)), reps)}


def gemm_kernels() -> dict:
    """Kernels (and memsets) one bias-free LM linear launches under each BLAS library (the graph shows one memset
    per language-model GEMM)."""
    from torch.profiler import ProfilerActivity, profile

    dev, dt = torch.device("cuda"), torch.bfloat16
    x, w = torch.randn(1047, 2560, device=dev, dtype=dt), torch.randn(6144, 2560, device=dev, dtype=dt)
    out = {}
    for blas in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(blas)
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                torch.nn.functional.linear(x, w)
            torch.cuda.synchronize()
        out[blas] = sorted({(e.key[:70], e.count) for e in prof.key_averages()})
    torch.backends.cuda.preferred_blas_library("cublas")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", type=int, default=1100)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    result = {}
    for segments in (1, 2, 4, 8):
        for memsets in (False, True):
            name = f"launch {a.kernels} kernels, {segments} graph(s)" + (", + memsets" if memsets else "")
            result[name] = launch(a.kernels, segments, a.reps, memsets)
            print(f"{name:44s} {result[name]}", flush=True)
    result["download"] = download(a.reps)
    print("download", json.dumps(result["download"], indent=1), flush=True)
    result["to_outputs"] = outputs_after_gpu_work(a.reps)
    print("to_outputs", result["to_outputs"], flush=True)
    result["gemm kernels"] = gemm_kernels()
    print("gemm kernels", result["gemm kernels"], flush=True)
    from bench_encode import process_costs

    result["process_costs"] = process_costs(torch.device("cuda"))
    print("process costs (ms), bare process:", result["process_costs"], flush=True)
    result["after parallel copy"] = after_parallel_copy(a.reps * 5)
    print("after parallel copy", result["after parallel copy"], flush=True)
    result["registered"] = registered_transfers(a.reps)
    print("registered", json.dumps(result["registered"], indent=1), flush=True)
    result["scan"] = scan(a.reps * 10)
    print("scan", result["scan"])
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
