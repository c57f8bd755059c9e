"""Peak VRAM of the shipped style-reference workflow run by a REAL ComfyUI server (main.py), per stage.

The server is the host's main.py started by tools/host_harness.ComfyServer (throw-away folders, loopback, this
pack and tools/tiny_nodes in custom_nodes) plus the bench-only node package bench/server_nodes: loaders that
build full-size random-init models of the real architectures with bench_workflow.py's builders (Z-Image Turbo
DiT 6.15B, Qwen3-4B text encoder, native Qwen3-VL-4B, Flux VAE; bf16) and a recorder around ComfyUI's
per-node executor (see bench/server_nodes/__init__.py for what it measures). The prompt is
workflows/api/VL Style Reference.json as shipped (1024², 8 steps res_multistep, CFG 1, shift 3, VL Encode
layer -6, VL Inspect and its preview included) with its loaders swapped for the bench ones, the way the host
tests swap in tiny models, and a TinyMemoryProbe in front of the KSampler (which models are loaded at the first
denoising step).

Per server configuration, prompts in this order (each changes the text / VL prompts and the seed, so every
node after the loaders runs again; the loaders' outputs stay cached, as a user's do):
  warmup          first run: the loaders build the models (their GPU use is not counted anywhere else)
  isolated        every model unloaded before every node: each stage's own requirement, its model load included
  on cold/warm    offload_after_encode on: from an empty GPU, then again with what ComfyUI kept loaded
  off cold/warm   the same with offload_after_encode off
The ratio reported is a run's peak against the largest isolated stage (target of issue 12: <= x1.10).

Configurations (--configs, comma separated; each one starts a fresh server): "full" = the whole card;
a number N = ComfyUI told the card has N GiB (--reserve-vram total-N); "+legacy" adds --disable-dynamic-vram
(ComfyUI 0.29 uses comfy-aimdo's dynamic VRAM by default when it works: "legacy" is the estimate-based
ModelPatcher that bench_workflow.py measures); "+lowvram" / "+normalvram" add those flags. Every server also
gets --cache-classic (unless --cache default), so the loaders' outputs are never evicted and rebuilt.

Run (GPU):   python bench/bench_server.py --comfy .comfy_host --configs full,24,24+legacy --out $OUT/server.json
Smoke (CPU): python bench/bench_server.py --tiny --cpu
Tables of a saved run: python bench/bench_server.py --summarize bench/results/server_h200_24.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tools import host_harness as hh  # noqa: E402

STYLE = "VL Style Reference"
STAGE_OF = {"CLIPTextEncode": "text_encode", "ZImageVL_Encode": "vl_encode", "ZImageVL_EmbeddingBlend": "blend",
            "KSampler": "sample", "VAEDecode": "decode", "ZImageVL_Inspect": "inspect", "SaveImage": "save",
            "PreviewImage": "save"}
STAGES = ("text_encode", "vl_encode", "blend", "sample", "decode", "inspect", "save", "other")
BENCH_LOADERS = {"UNETLoader": "BenchZImageModel", "VAELoader": "BenchVAE"}
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------------ prompt

def swap_loaders_for_bench(prompt: dict, size: str) -> dict:
    """The shipped workflow with UNETLoader / CLIPLoader (Qwen3-4B, Qwen3-VL) / VAELoader replaced by the bench
    loaders (links kept), as host_harness.swap_loaders_for_tiny does with the tiny ones."""
    out = {}
    for nid, node in prompt.items():
        ct = node.get("class_type")
        if ct == "CLIPLoader":
            ct = "BenchQwen3VLClip" if hh._is_vl_clip_loader(node) else "BenchZImageTextEncoder"
        elif ct in BENCH_LOADERS:
            ct = BENCH_LOADERS[ct]
        else:
            out[nid] = json.loads(json.dumps(node))
            continue
        out[nid] = {"class_type": ct, "inputs": {"size": size}, "_meta": {"title": "bench " + node["_meta"]["title"]}}
    return out


def has_pyav() -> bool:
    import importlib.util

    hidden = os.environ.get("ZIMAGE_VL_BENCH_HIDE_MODULES", "").split(",")      # see server_boot.py
    return "av" not in hidden and importlib.util.find_spec("av") is not None


def bench_prompt(run: int, offload: bool, tiny: bool, image: str, probe_file: str) -> dict:
    p = swap_loaders_for_bench(hh.load_api_workflow(STYLE), "tiny" if tiny else "full")
    hh.set_image(p, image)
    if not has_pyav():               # ComfyUI 0.29's LoadImage reads every file through PyAV
        for nid in hh.nodes_of(p, "LoadImage"):
            p[nid]["class_type"] = "BenchLoadImage"
    for nid in hh.nodes_of(p, "CLIPTextEncode"):
        p[nid]["inputs"]["text"] += f" (run {run})"
    encode = hh.node_of(p, "ZImageVL_Encode")
    p[encode]["inputs"]["prompt"] += f" (run {run})"
    p[encode]["inputs"]["offload_after_encode"] = offload
    sampler = hh.node_of(p, "KSampler")
    p[sampler]["inputs"]["seed"] = 42 + run
    if tiny:
        hh.set_inputs(p, "EmptySD3LatentImage", width=128, height=128)
        p[sampler]["inputs"]["steps"] = 2
    probe = hh.add_node(p, "TinyMemoryProbe", {"model": p[sampler]["inputs"]["model"], "filename": probe_file},
                        title="memory probe")
    p[sampler]["inputs"]["model"] = [probe, 0]
    return p


# ------------------------------------------------------------------------------------------------ configs

def total_gpu_gib() -> float:
    """The card's memory, read in a child process (this one never touches CUDA: the server sees the whole card)."""
    code = "import torch; print(torch.cuda.get_device_properties(0).total_memory)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) / GIB


def server_flags(spec: str, total_gib: float | None) -> list[str]:
    flags = []
    for part in spec.split("+"):
        if part == "full":
            continue
        if part == "legacy":
            flags.append("--disable-dynamic-vram")
        elif part in ("lowvram", "normalvram", "novram", "highvram"):
            flags.append("--" + part)
        else:
            try:
                card = float(part)
            except ValueError:
                raise SystemExit(f"--configs: unknown part {part!r} in {spec!r} (full, a GiB number, legacy, lowvram, "
                                 "normalvram, novram, highvram)") from None
            if total_gib is None:
                raise SystemExit(f"--configs {spec!r}: a card size needs the GPU")
            flags += ["--reserve-vram", f"{max(0.0, total_gib - card):.3f}"]
    return flags


PLAN = (("warmup", True, False, False), ("isolated", True, True, True), ("on cold", True, True, False),
        ("on warm", True, False, False), ("off cold", False, True, False), ("off warm", False, False, False))


def run_config(server: hh.ComfyServer, args, plan, runs: dict, save) -> None:
    """Queue the plan's prompts; each run's summary goes into `runs` (then save() is called) as soon as it is done."""
    side = 128 if args.tiny else 1024
    image = server.stage_ref_image("test_scene.png", size=side)
    for i, (label, offload, unload_first, isolate) in enumerate(plan):
        rec_file, probe_file = f"bench_{i}.json", f"probe_{i}.json"
        extra = {"zimage_vl_bench": {"file": rec_file, "unload_first": unload_first, "isolate": isolate}}
        t0 = time.perf_counter()
        server.submit(bench_prompt(i, offload, args.tiny, image, probe_file), timeout=args.prompt_timeout,
                      extra_data=extra)
        wall = time.perf_counter() - t0
        rec = json.loads((server.output_dir / rec_file).read_text(encoding="utf-8"))
        probe = json.loads((server.output_dir / probe_file).read_text(encoding="utf-8"))
        runs[label] = summarize_run(rec, probe, wall, offload)
        r = runs[label]
        print(f"  {label:<9} {wall:6.1f}s  peak alloc {fmt(r['peak_alloc'])}  reserved {fmt(r['peak_reserved'])}  "
              f"device used {fmt(r['peak_used'])}  at step 1: {r['loaded_at_step']}", flush=True)
        runs[label]["header"] = rec["header"]
        save()


def summarize_run(rec: dict, probe: dict, wall: float, offload: bool) -> dict:
    stages: dict[str, dict] = {}
    for row in rec["nodes"]:
        if row["cached"]:
            continue
        stage = STAGE_OF.get(row["class_type"], "load" if row["class_type"].startswith("Bench") else "other")
        s = stages.setdefault(stage, {"ms": 0.0, "nodes": []})
        s["ms"] += row["ms"]
        s["nodes"].append(row["class_type"])
        for key in ("peak_alloc", "peak_reserved", "peak_used"):
            if row.get(key) is not None:
                s[key] = max(s.get(key, 0), row[key])
        s["loaded_after"] = row["loaded_after"]
        for key in ("start_alloc", "start_used"):
            if key in row:
                s.setdefault(key, row[key])
        for key in ("end_alloc", "end_used"):
            if key in row:
                s[key] = row[key]
    out = {"offload_after_encode": offload, "wall_s": wall, "stages": stages,
           "loaded_at_step": sorted(f"{m['kind']}:{m['loaded_bytes'] / GIB:.1f}G" for m in (probe.get("step") or [])),
           "loaded_before_sampler_load": sorted(m["kind"] for m in (probe.get("before_load") or []))}
    for key in ("peak_alloc", "peak_reserved", "peak_used"):
        vals = [s[key] for s in stages.values() if key in s]
        out[key] = max(vals) if vals else None
    return out


def fmt(b) -> str:
    return "   n/a" if b is None else f"{b / GIB:6.2f}G"


def summary(name: str, res: dict) -> None:
    if "error" in res:
        print(f"\n==== {name}: FAILED: {res['error']}")
    runs = res["runs"]
    if not runs:
        return
    h = next(iter(runs.values()))["header"]
    print(f"\n==== {name}: main.py {' '.join(res['flags']) or '(no memory flags)'}; {h.get('gpu', 'cpu')}, "
          f"{h['vram_state']}, dynamic VRAM (aimdo) {'on' if h['aimdo_enabled'] else 'off'} "
          f"({h['core_model_patcher']}), reserved by ComfyUI {h['extra_reserved_vram'] / GIB:.2f} GiB")
    labels = [k for k in runs if k != "warmup"] or list(runs)      # the warm-up alone when nothing else finished
    print(f"{'stage':<12}" + "".join(f"{k:>30}" for k in labels) + "     (ms, peak alloc / device used)")
    for stage in STAGES:
        if not any(stage in runs[k]["stages"] for k in labels):
            continue
        cells = []
        for k in labels:
            s = runs[k]["stages"].get(stage)
            cells.append("" if s is None else f"{s['ms']:7.0f} {fmt(s.get('peak_alloc'))} {fmt(s.get('peak_used'))}")
        print(f"{stage:<12}" + "".join(f"{c:>30}" for c in cells))
    print(f"{'peak':<12}" + "".join(f"{runs[k]['wall_s'] * 1e3:7.0f} {fmt(runs[k]['peak_alloc'])} {fmt(runs[k]['peak_used'])}"
                                     .rjust(30) for k in labels))
    for key, ratio in ratios(runs).items():
        print(f"  {key}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratio.items() if v is not None))
    for k in labels:
        print(f"  {k}: loaded at the first denoising step: {runs[k]['loaded_at_step']}")


def ratios(runs: dict) -> dict:
    iso = runs.get("isolated")
    if iso is None:
        return {}
    out = {}
    for key in ("peak_alloc", "peak_used"):
        vals = [s[key] for s in iso["stages"].values() if s.get(key) is not None]
        if not vals:
            continue
        largest = max(vals)
        out[f"{key} / largest isolated stage ({largest / GIB:.2f} GiB)"] = {
            k: (r[key] / largest if r.get(key) is not None else None) for k, r in runs.items()
            if k not in ("warmup", "isolated")}
    return out


def save(path, results) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=1, default=str))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models, 128² (a smoke test of the script)")
    ap.add_argument("--cpu", action="store_true", help="run the server with --cpu")
    ap.add_argument("--comfy", default=None, help="ComfyUI root with main.py (default $COMFYUI_PATH, ./.comfy_host, "
                                                  "~/ComfyUI)")
    ap.add_argument("--configs", default="full", help="comma-separated server configurations (see the docstring)")
    ap.add_argument("--offload", choices=("both", "on", "off"), default="both")
    ap.add_argument("--cache", choices=("classic", "default"), default="classic",
                    help="ComfyUI's output cache: classic (--cache-classic: the loaders' outputs stay cached, so no "
                         "run rebuilds a model) or its default RAM-pressure cache")
    ap.add_argument("--prompt-timeout", type=float, default=300.0)
    ap.add_argument("--work", default=None, help="folder for the servers' throw-away folders and logs")
    ap.add_argument("--out", default=None, help="JSON with every figure (rewritten after each configuration)")
    ap.add_argument("--log", default=None, help="append every server's log to this file")
    ap.add_argument("--summarize", default=None, metavar="JSON", help="only print the tables of a saved --out file")
    args = ap.parse_args(argv)
    if args.summarize:
        for spec, res in json.loads(Path(args.summarize).read_text(encoding="utf-8"))["configs"].items():
            summary(spec, res)
        return 0

    root = next((Path(c) for c in (args.comfy, os.environ.get("COMFYUI_PATH"), HERE.parent / ".comfy_host",
                                   Path.home() / "ComfyUI") if c and (Path(c) / "main.py").is_file()), None)
    if root is None:
        sys.exit("no ComfyUI with main.py found: pass --comfy or set COMFYUI_PATH")
    total = None if args.cpu else total_gpu_gib()
    plan = [p for p in PLAN if args.offload == "both" or p[0] in ("warmup", "isolated") or p[0].startswith(args.offload)]
    work = Path(args.work or tempfile.mkdtemp(prefix="zimage_vl_bench_server_"))
    results = {"comfy": str(root), "total_gpu_gib": total, "configs": {},
               "image_loader": "LoadImage" if has_pyav() else "BenchLoadImage (PIL: no PyAV here)"}
    for spec in [c.strip() for c in args.configs.split(",") if c.strip()]:
        flags = server_flags(spec, total) + (["--cache-classic"] if args.cache == "classic" else []) + \
            ["--front-end-root", str(work / "no_frontend")]
        (work / "no_frontend").mkdir(parents=True, exist_ok=True)
        server = hh.ComfyServer(root.resolve(), work / spec.replace("+", "_"), cpu=args.cpu, extra_args=flags,
                                launcher=[HERE / "server_boot.py"], extra_custom_nodes={"zimage_vl_bench_nodes": HERE / "server_nodes"},
                                tiny_hf=False)
        print(f"== {spec}: main.py {' '.join(flags)}", flush=True)
        res = results["configs"][spec] = {"flags": flags[:-2], "runs": {}}
        t0 = time.perf_counter()
        try:
            server.prepare()
            server.start()
            res["boot_s"] = time.perf_counter() - t0
            print(f"  server up in {res['boot_s']:.1f}s", flush=True)
            run_config(server, args, plan, res["runs"], lambda: save(args.out, results))
            res["ratios"] = ratios(res["runs"])
        except Exception as e:  # noqa: BLE001 - keep the other configurations' figures
            res["error"] = f"{type(e).__name__}: {e}"
            res["log_tail"] = server.log_tail(60)
            print(f"  FAILED: {res['error']}\n{res['log_tail']}", flush=True)
        finally:
            server.stop()
            if args.log:
                with open(args.log, "a", encoding="utf-8") as f:
                    f.write(f"\n===== {spec}: {' '.join(flags)}\n{server.log_text()}")
        save(args.out, results)
    for spec, res in results["configs"].items():
        summary(spec, res)
    return 0 if all("error" not in r for r in results["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
