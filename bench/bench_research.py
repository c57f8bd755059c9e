"""Cost of the research techniques (issue 9): steering from 16 pairs, the calibration solve, Gram matching.

  steering     the Steering Direction node's encode path (nodes/steer.encode_images: encode_many in chunks,
               the pairs' images fitted to the token budget) + steering_direction, 16 pairs of 1024² images,
               against one encode_many of the same 32 images (the issue's bound: ≤ ×1.2)
  calibration  fit_calibration (ridge, λ chosen on held-out prompts, then refitted) on 200 prompts of 24–40
               aligned tokens × 2560 on the device: the solve alone (the encodes are timed by bench_encode.py)
  gram         gram_match optimiser steps per second, 1054 VL tokens × 2560 against a 32-token text
  cal_encode   the calibration's VL encodes: encode_texts (prompts right-padded, one forward per batch) on the
               200 first shipped prompts against one encode([], prompt) each (Z-Image's text CLIP side needs
               a ComfyUI CLIP and is covered by the host tests, not timed here)

Full-size random-init Qwen3-VL-4B (transformers class, bf16, the fast runner) for steering; random tensors of
the real widths for the other two. Medians of `--reps` runs after a warm-up.

Run (GPU):   python bench/bench_research.py --comfy .comfy_host --out $OUT/research.json
Smoke (CPU): python bench/bench_research.py --tiny --device cpu --reps 1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("zimage_vl_bench_encode", HERE / "bench_encode.py")
be = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(be)

PROMPT = "Describe the style, colours, lighting and composition of this image."


def timed(fn, device, reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        be.sync(device)
        t0 = time.perf_counter()
        fn()
        be.sync(device)
        out.append(time.perf_counter() - t0)
    return out


def bench_steering(args, device, dtype) -> dict:
    import torch

    steer_node = common.import_pack("nodes.steer")
    steer = common.import_pack("vl_core.steer")
    tq = common.import_pack("vl_core.encoders.transformers_qwen3vl")
    model, tok = be.build_hf(common.find_comfy(args.comfy), args.tiny, device, dtype)
    enc = tq.TransformersQwen3VL(model, tok, source="random-init", output_device=device)
    side, pairs = (64 if args.tiny else 1024), args.pairs
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(pairs, side, side, 3, generator=g), torch.rand(pairs, side, side, 3, generator=g)
    layers = [enc.num_layers - 5]
    tokens = 1024 if not args.tiny else 16

    def node_path():
        p, n = steer_node.encode_images(enc, [("positive", pos), ("negative", neg)], PROMPT, layers, tokens, "full")
        return steer.steering_direction(p, n, "mean_diff", 1)

    pictures = [im for im in torch.cat([pos, neg])]

    def encode_many():
        return enc.encode_many(pictures, PROMPT, layers, "after_image")

    a, b = timed(node_path, device, args.reps), timed(encode_many, device, args.reps)
    ma, mb = statistics.median(a), statistics.median(b)
    return {"pairs": pairs, "side": side, "node_s": ma, "encode_many_s": mb, "ratio": ma / mb,
            "node_runs_s": a, "encode_many_runs_s": b}


def bench_calibration(args, device) -> dict:
    import torch

    cal = common.import_pack("vl_core.calibrate")
    width = 64 if args.tiny else 2560
    g = torch.Generator(device="cpu").manual_seed(1)
    true_w = torch.randn(width, width, generator=g) / width ** 0.5
    pairs = []
    for i in range(200):
        n = 24 + i % 17
        x = torch.randn(n, width, generator=g)
        pairs.append((x.to(device), (x @ true_w + 0.01 * torch.randn(n, width, generator=g)).to(device)))
    runs = timed(lambda: cal.fit_calibration(pairs, "linear", [30], 36), device, args.reps)
    return {"prompts": 200, "tokens": sum(p[0].shape[0] for p in pairs), "width": width,
            "solve_s": statistics.median(runs), "runs_s": runs}


def bench_gram(args, device) -> dict:
    import torch

    gram = common.import_pack("vl_core.gram")
    width = 64 if args.tiny else 2560
    g = torch.Generator(device="cpu").manual_seed(2)
    text = torch.randn(1, 32, width, generator=g).to(device)
    vl = torch.randn(1, 1054, width, generator=g).to(device)
    steps = 20 if args.tiny else 400
    settings = gram.GramSettings(steps=steps, patience=steps)   # no early stop: time every step

    def run():
        with torch.inference_mode(False):
            return gram.gram_match(text, vl, settings, device=device)

    runs = timed(run, device, args.reps)
    return {"vl_tokens": 1054, "width": width, "steps": steps, "steps_per_s": steps / statistics.median(runs),
            "runs_s": runs}


def bench_calibration_encodes(args, device, dtype) -> dict:
    cal = common.import_pack("vl_core.calibrate")
    tq = common.import_pack("vl_core.encoders.transformers_qwen3vl")
    model, tok = be.build_hf(common.find_comfy(args.comfy), args.tiny, device, dtype)
    enc = tq.TransformersQwen3VL(model, tok, source="random-init", output_device=device)
    prompts = cal.load_prompts(str(HERE.parent / "vl_core" / "data" / "calibration_prompts.txt"))[:200]
    layers = [enc.num_layers - 5]
    batched = timed(lambda: enc.encode_texts(prompts, layers), device, args.reps)
    single = timed(lambda: [enc.encode([], p, layers, "after_image") for p in prompts], device, args.reps)
    mb, ms = statistics.median(batched), statistics.median(single)
    return {"prompts": len(prompts), "batched_s": mb, "one_at_a_time_s": ms, "speedup": ms / mb,
            "batched_runs_s": batched, "one_at_a_time_runs_s": single}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--comfy", default=None)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", choices=("steering", "calibration", "gram", "cal_encode"), action="append")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    common.import_host(common.find_comfy(args.comfy), cpu=args.device == "cpu")
    import torch

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    results = {"info": info}
    wanted = args.only or ["calibration", "gram", "steering", "cal_encode"]
    if "calibration" in wanted:
        results["calibration"] = r = bench_calibration(args, device)
        print(f"calibration: ridge fit on {r['prompts']} prompts / {r['tokens']} tokens × {r['width']}: "
              f"{r['solve_s']:.3f} s (target ≤ 1 s)", flush=True)
    if "gram" in wanted:
        results["gram"] = r = bench_gram(args, device)
        print(f"gram: {r['steps_per_s']:.0f} steps/s for {r['vl_tokens']} VL tokens × {r['width']} (target ≥ 200)",
              flush=True)
    if "steering" in wanted:
        results["steering"] = r = bench_steering(args, device, dtype)
        print(f"steering: {r['pairs']} pairs at {r['side']}²: node path {r['node_s']:.3f} s vs encode_many "
              f"{r['encode_many_s']:.3f} s (×{r['ratio']:.2f}, target ≤ ×1.2)", flush=True)
    if "cal_encode" in wanted:
        results["cal_encode"] = r = bench_calibration_encodes(args, device, dtype)
        print(f"calibration VL encodes: {r['prompts']} prompts batched {r['batched_s']:.3f} s vs one at a time "
              f"{r['one_at_a_time_s']:.3f} s (×{r['speedup']:.1f})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
