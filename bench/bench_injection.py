"""Per-step cost of the DiT Layer Injection on the full-size Z-Image (random init), through the node's real code.

Builds ComfyUI's own Z-Image Turbo architecture (comfy.supported_models.ZImage with the config
comfy/model_detection.py derives for it: dim 3840, 30 layers, 30 heads, cap_feat_dim 2560, 6.15B
parameters) with random weights in bf16 on the GPU, then samples with comfy.sample.sample (Euler,
CFG 1, shift 3) on a 128×128 latent (1024² image) with a 32-token caption, for:

    baseline                      the unpatched model
    caption_stream@30             apply_injection(method="caption_stream", block_weights="all")
    naive lerp@30                 reference only: a plain out-of-place lerp double_block patch, for comparison
    caption_stream@30 cosine      the same with a cosine schedule (the step's sigma is read on the host)
    caption_stream hooks, w=0     reference only: the caption_stream hooks with every block weight 0
    extra_attention N             method="extra_attention", all 30 blocks, token_budget N
    2 chained extra_attention N   two DiT Layer Injection applications on one model (own keys), first N
    concat N                      method="concat", token_budget N (N VL tokens appended to the caption)

and, with --suite reference (or all), the reference-latent attention of a 1024² reference latent:

    reference matched@30          method="reference_attention", reference_noise matched, all 30 blocks
    reference matched@0-14        the same at blocks 0-14 (the reference runs only as deep as block 14)
    reference clean@30            reference_noise clean (K/V computed once per run, cached)
    reference clean@30 joint      share=joint (one softmax over own + reference keys)
    reference clean@30 + mask     a half-image MASK
    extra_attention 256 + mask    the same mask on extra_attention 256 (against extra_attention 256)
    concat 4096                   concat of as many VL tokens as the reference has image tokens

for N in (256, 1024) (the VL input has 1054 tokens, a 1024² image, area-pooled to N). Configurations
are interleaved over rounds; the reported time is the median per step (whole sampler step, model
call included) and the ratio to the baseline of the same run.

Run (GPU): python bench/bench_injection.py --out result.json
Smoke test (CPU, tiny model): python bench/bench_injection.py --tiny --device cpu
ComfyUI comes from --comfy, $COMFYUI_PATH, ./.comfy_host (a git-ignored copy carried to the GPU
machine) or $HOME/ComfyUI, in that order.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from common import ZIMAGE_CONFIG, find_comfy, import_host, import_pack

FULL = ZIMAGE_CONFIG
TINY = dict(FULL, dim=256, n_layers=4, n_heads=2, n_kv_heads=2, cap_feat_dim=256)


def import_injection():
    return import_pack("nodes.injection", bare=("nodes",)), import_pack("vl_core.types")


def build_model(cfg: dict, device, dtype, seed: int = 0):
    import torch
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.ZImage(dict(cfg))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.diffusion_model.named_parameters()):
            if "pad_token" in name:
                p.normal_(0.0, 1.0, generator=gen)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.numel() // p.shape[0]), generator=gen)
            elif name.endswith(".weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.diffusion_model.to(device=device, dtype=dtype)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device), params


def naive_caption_lerp(base, vl, injection, caption_len: int, device, dtype):
    """Reference point (not the node): a double_block patch that returns {"txt": torch.lerp(txt, e, 0.5)} at every
    block (out of place, the model copies it back), e = the same embedded VL tokens, computed once here."""
    import torch

    dit = base.model.diffusion_model
    length = injection.inject.padded_length(caption_len, dit.pad_tokens_multiple)
    with torch.inference_mode():
        feats = injection.pooling.match_length(vl.tokens().float(), length, "pool").to(device=device, dtype=dtype)
        e = injection.embed_like_caption(dit, feats, {})[0].clone()
    m = base.clone()
    m.set_model_double_block_patch(lambda args: {"txt": torch.lerp(args["txt"], e, 0.5)})
    return m


def zero_weight(base, vl, injection):
    """Reference point: the caption_stream hooks installed with every block weight 0 (their fixed cost)."""
    inj = injection.build_injection(base, vl, method="caption_stream", strength=0.5, block_weights="all")
    inj.block_scale = [0.0] * len(inj.block_scale)
    m = base.clone()
    injection.install_injection(m, inj)
    return m


def sample_once(model, noise, latent, cond, steps: int):
    import torch
    import comfy.sample

    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, seed=0,
                                   disable_pbar=True)


def exactness_checks(base, vl, injection, noise, latent, cond, steps: int, device) -> dict:
    """On the real device: the async sigma read, and bit-identity when the window never opens."""
    import torch

    out = {}
    probe = torch.tensor([0.123456, 9.0], device=device)
    out["sigma_reader returns the step sigma"] = injection.sigma_reader(probe)() == float(probe[0].item())
    ref = sample_once(base, noise, latent, cond, steps)
    for method in ("caption_stream", "extra_attention", "concat"):
        # the simple schedule's last step starts at (steps-1)/steps < 0.95: the window never opens
        late = injection.apply_injection(base, vl, method=method, strength=0.5, block_weights="all",
                                         start_percent=0.95, schedule_name="linear_down")
        out[f"{method}, window past the last step: bit-identical"] = bool(
            torch.equal(sample_once(late, noise, latent, cond, steps), ref))
    cos = injection.apply_injection(base, vl, method="caption_stream", strength=0.5, block_weights="all",
                                    schedule_name="cosine", start_percent=0.3)
    out["caption_stream cosine from 30%: changes the output"] = not bool(
        torch.equal(sample_once(cos, noise, latent, cond, steps), ref))
    return out


def time_sample(model, noise, latent, cond, steps: int, device) -> tuple[float, bool]:
    import torch
    import comfy.sample

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, seed=0,
                                  disable_pbar=True)
    sync()
    return (time.perf_counter() - t0) / steps, bool(torch.isfinite(out).all())


def core_configs(base, vl, injection, budgets, cond, device, dtype) -> dict:
    configs = {"caption_stream@30": injection.apply_injection(base, vl, method="caption_stream", strength=0.5,
                                                              block_weights="all"),
               "naive lerp@30": naive_caption_lerp(base, vl, injection, cond[0][0].shape[1], device, dtype),
               "caption_stream@30 cosine": injection.apply_injection(base, vl, method="caption_stream", strength=0.5,
                                                                     block_weights="all", schedule_name="cosine"),
               "caption_stream hooks, w=0": zero_weight(base, vl, injection)}
    for n in budgets:
        configs[f"extra_attention {n}"] = injection.apply_injection(base, vl, method="extra_attention", strength=0.5,
                                                                    block_weights="all", token_budget=n)
    first = injection.apply_injection(base, vl, node_id="a", method="extra_attention", strength=0.5,
                                      block_weights="all", token_budget=budgets[0])
    configs[f"2 chained extra_attention {budgets[0]}"] = injection.apply_injection(
        first, vl, node_id="b", method="extra_attention", strength=0.5, block_weights="all", token_budget=budgets[0])
    for n in budgets:
        configs[f"concat {n}"] = injection.apply_injection(base, vl, method="concat", strength=0.5,
                                                           block_weights="all", token_budget=n)
    return configs


def reference_configs(base, vl, vl_types, injection, side: int, width: int, g) -> dict:
    import torch

    ref = {"samples": torch.randn(1, 16, side, side, generator=g)}
    mask = torch.zeros(1, side * 8, side * 8)
    mask[..., : side * 4] = 1.0

    def reference(**kw):
        return injection.apply_injection(base, None, method="reference_attention", strength=0.5, reference=ref,
                                         **{"block_weights": "all", **kw})

    n_img = (side // 2) ** 2
    many = vl_types.VLEmbeds(hidden={30: torch.randn(1, n_img, width, generator=g)}, image_spans=((0, n_img),),
                             prompt_span=(0, 0), num_layers=36, source="bench")
    return {"reference matched@30": reference(),
            "reference matched@0-14": reference(block_weights="early" if side < 64 else "0-14"),  # tiny: 4 blocks
            "reference clean@30": reference(reference_noise="clean"),
            "reference clean@30 joint": reference(reference_noise="clean", share="joint"),
            "reference clean@30 + mask": reference(reference_noise="clean", mask=mask),
            "extra_attention 256": injection.apply_injection(base, vl, method="extra_attention", strength=0.5,
                                                             block_weights="all", token_budget=256),
            "extra_attention 256 + mask": injection.apply_injection(base, vl, method="extra_attention", strength=0.5,
                                                                    block_weights="all", token_budget=256, mask=mask),
            f"concat {n_img}": injection.apply_injection(base, many, method="concat", strength=1.0,
                                                         block_weights="all", token_budget=0)}


def profile_config(name: str, model, noise, latent, cond, device) -> None:
    """Print the top CUDA kernels of 2 sampler steps of one configuration."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    time_sample(model, noise, latent, cond, 2, device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time_sample(model, noise, latent, cond, 2, device)
    print(f"\nprofile {name} (2 steps):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny model (dim 256, 4 layers) for a CPU smoke test")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--comfy", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 128 = 1024² image; tiny: 32)")
    ap.add_argument("--caption", type=int, default=32)
    ap.add_argument("--vl-tokens", type=int, default=1054)
    ap.add_argument("--budgets", default="256,1024")
    ap.add_argument("--suite", choices=("core", "reference", "all"), default="all")
    ap.add_argument("--profile", default=None, metavar="CONFIG",
                    help="after timing, profile 2 steps of these configs (comma-separated names; torch.profiler, "
                         "top CUDA kernels) against the baseline")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    comfy_root = find_comfy(args.comfy)
    import_host(comfy_root, cpu=args.device == "cpu")
    import torch

    injection, vl_types = import_injection()
    device = torch.device(args.device)
    cfg = TINY if args.tiny else FULL
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    side = args.latent or (32 if args.tiny else 128)
    budgets = [int(b) for b in args.budgets.split(",") if b]

    t0 = time.perf_counter()
    base, params = build_model(cfg, device, dtype)
    print(f"model: NextDiT dim {cfg['dim']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, {params / 1e9:.3f}B "
          f"params, {dtype}, built in {time.perf_counter() - t0:.1f}s on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}); torch {torch.__version__}; "
          f"ComfyUI from {comfy_root}", flush=True)

    g = torch.Generator().manual_seed(1)
    width = cfg["cap_feat_dim"]
    cond = [[torch.randn(1, args.caption, width, generator=g), {}]]
    vl = vl_types.VLEmbeds(hidden={30: torch.randn(1, args.vl_tokens, width, generator=g)},
                           image_spans=((0, args.vl_tokens),), prompt_span=(0, 0), num_layers=36, source="bench")
    latent = torch.zeros(1, 16, side, side)
    noise = torch.randn(1, 16, side, side, generator=g)

    configs = {"baseline": base}
    if args.suite in ("core", "all"):
        configs.update(core_configs(base, vl, injection, budgets, cond, device, dtype))
    if args.suite in ("reference", "all"):
        configs.update(reference_configs(base, vl, vl_types, injection, side, width, g))

    times = {k: [] for k in configs}
    finite, peak = {}, {}
    for name, model in configs.items():  # warm-up: kernels, caches, the VL embedding; the peak of a run
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        _, finite[name] = time_sample(model, noise, latent, cond, 2, device)
        if device.type == "cuda":
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    short = {k: [] for k in configs}  # 2-step runs: (N·t_N − 2·t_2)/(N − 2) = the per-step cost without
    for r in range(args.rounds):       # once-per-run work (sampler setup, a clean reference's pass)
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            t, ok = time_sample(configs[name], noise, latent, cond, args.steps, device)
            times[name].append(t)
            if args.steps > 2:
                short[name].append(time_sample(configs[name], noise, latent, cond, 2, device)[0])
            finite[name] = finite[name] and ok
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {1e3 * times[k][-1]:.2f} ms" for k in configs),
              flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    marginal = {k: (args.steps * med[k] - 2 * statistics.median(short[k])) / (args.steps - 2)
                for k in configs if short[k]}
    base_t = med["baseline"]
    rows = []
    print(f"\nper-step time, median of {args.rounds} rounds x {args.steps} steps "
          f"(latent {side}x{side}, caption {args.caption} tokens, VL {args.vl_tokens} tokens):")
    print(f"{'config':<28} {'ms/step':>9} {'ratio':>8} {'min..max ms':>16} finite")
    for k in configs:
        ratio = med[k] / base_t
        m = marginal.get(k)
        rows.append({"config": k, "ms_per_step": 1e3 * med[k], "ratio": ratio, "peak_gib": peak.get(k),
                     "marginal_ms_per_step": None if m is None else 1e3 * m,
                     "marginal_ratio": None if m is None else m / marginal["baseline"],
                     "min_ms": 1e3 * min(times[k]), "max_ms": 1e3 * max(times[k]), "finite": finite[k],
                     "all_ms": [1e3 * t for t in times[k]]})
        print(f"{k:<28} {1e3 * med[k]:>9.2f} {ratio:>8.4f} {1e3 * min(times[k]):>7.2f}..{1e3 * max(times[k]):<7.2f} "
              f"{finite[k]} peak {peak.get(k, float('nan')):.2f} GiB"
              + (f"  marginal {1e3 * m:.2f} ms x{m / marginal['baseline']:.4f}" if m is not None else ""))
    checks = {}
    limits = {"caption_stream@30": 1.01, "caption_stream@30 cosine": 1.01, f"2 chained extra_attention {budgets[0]}": 1.09,
              "reference matched@30": 2.20, "reference matched@0-14": 1.60, "reference clean@30": 1.20}
    for k, limit in limits.items():
        if k in med:
            checks[f"{k} <= x{limit}"] = med[k] / base_t <= limit
    if "reference clean@30" in marginal:  # its pass runs once per run: the per-step cost without it
        checks["reference clean@30 marginal <= x1.2"] = marginal["reference clean@30"] / marginal["baseline"] <= 1.2
    for n in budgets:
        if f"concat {n}" in med and f"extra_attention {n}" in med:
            checks[f"extra_attention {n} <= concat {n}"] = med[f"extra_attention {n}"] <= med[f"concat {n}"]
    if "extra_attention 256 + mask" in med:
        checks["a mask adds <= 1 % (extra_attention 256)"] = med["extra_attention 256 + mask"] <= 1.01 * med[
            "extra_attention 256"]
    if "reference clean@30 + mask" in med:
        checks["a mask adds <= 1 % (reference clean@30)"] = med["reference clean@30 + mask"] <= 1.01 * med[
            "reference clean@30"]
    for k, ok in checks.items():
        print(f"target {k}: {'MET' if ok else 'MISSED'}")
    for name in (args.profile.split(",") if args.profile else []):
        profile_config(name, configs[name], noise, latent, cond, device)
    exact = exactness_checks(base, vl, injection, noise, latent, cond, min(args.steps, 4), device)
    for k, ok in exact.items():
        print(f"check {k}: {'OK' if ok else 'FAILED'}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "params": params, "config": cfg, "latent": side,
            "caption_tokens": args.caption, "vl_tokens": args.vl_tokens, "steps": args.steps, "rounds": args.rounds,
            "rows": rows, "targets": checks, "checks": exact}, indent=2))
    return 0 if all(finite.values()) and all(exact.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
