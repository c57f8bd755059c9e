"""Cold vs warm VL encodes: one fresh process per case (fusion mode × inductor cache state), each timing its first
encode, the background compile, the encodes during and after it, the GPU replay and the host copy probe.

Called by bench_encode.py (`--cold-runs`, which re-runs bench_encode.py with `--cold-probe` per case).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host_parts import host_copy_probe, native_host_parts


COLD_CASES = (("today: fusion off", "off", "empty"), ("fused: empty inductor cache", "auto", "empty"),
              ("fused: warm disk cache", "auto", "warm"), ("fused sync: warm disk cache", "sync", "warm"),
              ("fused: warm Triton cache, no FX / AOT cache", "auto", "nofx"),   # diagnose the warm-cache replays
              ("fused: warm caches, no autotune cache", "auto", "notune"))


def cold_runs(args, script: str) -> int:
    """Fresh processes (one per case) of `script` --cold-probe: first encode, compile wall time, then steady
    encodes (cold_probe)."""
    cache = tempfile.mkdtemp(prefix="zimage_vl_inductor_")
    out = {}
    picked = {int(i) for i in args.cold_cases.split(",")} if args.cold_cases else set(range(len(COLD_CASES)))
    for name, mode, state in (case for i, case in enumerate(COLD_CASES) if i in picked):
        env = dict(os.environ, ZIMAGE_VL_COMPILE=mode,
                   TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="zimage_vl_empty_") if state == "empty" and
                   mode == "off" else cache)
        env.pop("TRITON_CACHE_DIR", None)
        if state == "nofx":
            env.update(TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        if state == "notune":     # read by cold_probe: inductor re-benchmarks the kernels' launch configs
            env.update(ZIMAGE_VL_BENCH_NO_AUTOTUNE_CACHE="1")
        cmd = [sys.executable, script, "--cold-probe", mode, "--sizes", args.sizes, "--device", args.device]
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--comfy", args.comfy] if args.comfy else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COLD ")]
        out[name] = json.loads(lines[-1][5:]) if lines else {"error": proc.stderr[-2000:]}
        out[name]["warnings"] = [ln[-300:] for ln in proc.stderr.splitlines() if "Qwen3-VL runner" in ln][-5:]
        out[name]["process_s"] = time.perf_counter() - t0
        print(f"{name:<30} {out[name]}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 0


def cold_probe(args, native_clip, clip, fusion, device, prompt: str, sync) -> int:
    """One fresh process: wall time of each encode (synchronised) from the very first one on, and when the fused
    steps became active; the first size of --sizes, then one other size (recompile check)."""
    import torch
    from torch._dynamo.utils import counters

    if os.environ.get("ZIMAGE_VL_BENCH_NO_AUTOTUNE_CACHE"):
        import torch._inductor.config as inductor_config
        inductor_config.autotune_local_cache = False
    size = [int(s) for s in args.sizes.split(",") if s][0] if not args.tiny else 64
    native = native_clip.NativeQwen3VLEncoder(clip)
    layer = -6 if not args.tiny else -2
    layer = native.num_layers + 1 + layer
    g = torch.Generator().manual_seed(7)
    image = torch.rand(size, size, 3, generator=g)

    def timed():
        t0 = time.perf_counter()
        native.encode([image], prompt, [layer], "after_image")
        sync(device)
        return 1e3 * (time.perf_counter() - t0)

    at_start = host_copy_probe(image)       # before any encode / compile of this process
    res = {"mode": args.cold_probe, "first_ms": timed(), "host_copy_at_start": at_start}
    res["second_ms_during_compile"] = timed() if fusion.Fusion.busy() else None
    t0 = time.perf_counter()
    fusion.Fusion.wait()
    res["compile_wait_s"] = time.perf_counter() - t0
    res["status"] = fusion.Fusion.status()
    res["next_ms"] = [timed() for _ in range(12)]      # eager, capture (fused steps), replays
    res["replay_median_ms"] = statistics.median(res["next_ms"][2:])
    cache = native.graphs
    res["graphs"] = {"captured": len(cache), "broken": cache.broken}     # did the replays really replay a graph
    parts = native_host_parts(native, native_clip, image, layer, 10, prompt)     # GPU replay vs host time of this process
    replays = {k: v["median_ms"] for k, v in parts.items() if k.startswith("gpu replay")}
    res["gpu_replay_ms"] = round(sum(replays.values()), 3) if replays else None
    res["host_parts_ms"] = {k: v["median_ms"] for k, v in parts.items() if k not in replays}
    res["host_copy"] = host_copy_probe(image)
    if os.environ.get("ZIMAGE_VL_BENCH_IDLE_S"):      # does a slow copy recover once the process idles?
        time.sleep(float(os.environ["ZIMAGE_VL_BENCH_IDLE_S"]))
        res["host_copy_after_idle"] = host_copy_probe(image)
    graphs = counters["stats"]["unique_graphs"]
    other = torch.rand(size // 2, size // 2, 3, generator=g)
    t0 = time.perf_counter()
    native.encode([other], prompt, [layer], "after_image")
    sync(device)
    res["other_size_first_ms"] = 1e3 * (time.perf_counter() - t0)
    res["other_size_new_graphs"] = counters["stats"]["unique_graphs"] - graphs
    print("COLD " + json.dumps(res), flush=True)
    return 0
