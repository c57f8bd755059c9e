"""How an image's staging copy can run beside the encode's Python work: the copy (12 MB float32 → float16 into
pinned memory, 4-thread OpenMP team) next to ≈ a preamble's worth of Python with a few torch calls, after 25 ms
idle (as between encodes), in five forms: in series; on a Python worker thread with a hand-shake (the caller waits
until the worker took the job: vl_core/encoders/staging.py's form); without it (the worker waits for the GIL);
with `time.sleep(0)` after the submit; and a TorchScript `torch.jit.fork` (a C++ inter-op thread, no GIL).
Prints median µs of the whole, and when the worker's copy started. CUDA machine (pinned memory).

    python3 bench/handoff_probe.py [--reps 40] [--out probe.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vl_core.encoders.openmp import team_size  # noqa: E402


@torch.jit.script
def _copy(dst: torch.Tensor, src: torch.Tensor) -> int:
    dst.copy_(src)
    return 0


@torch.jit.script
def _forked_copy(dst: torch.Tensor, src: torch.Tensor) -> torch.jit.Future[int]:
    return torch.jit.fork(_copy, dst, src)     # (forked inside TorchScript: asynchronous; from Python it is not)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pool = ThreadPoolExecutor(1)
    pixels = (torch.rand(1024, 1024, 3) * 255).round().to(torch.uint8).numpy()
    buf = torch.empty(1024, 1024, 3, dtype=torch.float16, pin_memory=True)
    table, small = {i: i for i in range(2000)}, torch.zeros(8)
    stamp: dict = {}

    def preamble():                 # Python work with a few torch calls (which release the GIL)
        s = 0
        for i in range(5000):
            s += table[i % 2000]
            if i == 2500:
                torch.cuda.mem_get_info()
                small.view(2, 4).unsqueeze(0)
        return s

    def job(src, started=None):
        stamp["start"] = time.perf_counter()
        if started is not None:
            started.set()
        with team_size(4):
            buf.copy_(src)

    def once(form, src):
        t0 = time.perf_counter()
        stamp["start"] = t0
        if form == "in series":
            preamble()
            job(src)
        elif form == "thread, hand-shake":
            started = threading.Event()
            done = pool.submit(job, src, started)
            started.wait()
            preamble()
            done.result()
        elif form == "thread, no hand-shake":
            done = pool.submit(job, src)
            preamble()
            done.result()
        elif form == "thread, sleep(0)":
            done = pool.submit(job, src)
            time.sleep(0)
            preamble()
            done.result()
        else:                       # TorchScript fork
            done = _forked_copy(buf, src)
            preamble()
            done.wait()
        started_us = None if form == "torchscript fork" else 1e6 * (stamp["start"] - t0)    # (no Python stamp there)
        return 1e6 * (time.perf_counter() - t0), started_us

    forms = ["in series", "thread, hand-shake", "thread, no hand-shake", "thread, sleep(0)", "torchscript fork"]
    once("in series", torch.from_numpy(pixels.astype(np.float32) / 255.0))
    runs: dict = {f: [] for f in forms}
    for _ in range(args.reps):
        for form in forms:          # interleaved
            src = torch.from_numpy(pixels.astype(np.float32) / 255.0)     # a new image, as LoadImage makes one
            time.sleep(0.025)
            runs[form].append(once(form, src))
    t0 = time.perf_counter()
    preamble()
    result = {"preamble_us": round(1e6 * (time.perf_counter() - t0), 1)}
    for form, rows in runs.items():
        total, start = zip(*rows)
        result[form] = {"total_us": round(statistics.median(total), 1),
                        "copy_started_after_us": None if start[0] is None else round(statistics.median(start), 1)}
        print(f"{form:<24} {result[form]}", flush=True)
    print("preamble alone (µs):", result["preamble_us"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
