"""VL encode latency / peak memory / batch throughput of both backends vs the two baselines, in one run.

Builds a random-init full-size Qwen3-VL-4B (the real config: text 2560 x 36 layers, 32/8 heads of 128,
FFN 9728; vision 1024 x 24, 16 heads, patch 16, DeepStack [5, 11, 17]) as a transformers
Qwen3VLForConditionalGeneration in bf16 on the GPU, and ComfyUI's own native Qwen3-VL-4B
(comfy.sd.CLIP over comfy.text_encoders.qwen3vl) sharing the very same weight tensors, then measures
through this pack's real code (nodes/native_clip.py, nodes/transformers_model.py, vl_core):

  native fast        NativeQwen3VLEncoder.encode (ComfyUI's loaded modules through vl_core's runner), the
                     runner's elementwise steps eager (fusion off); "fused": torch.compile'd steps (fusion.py)
  transformers fast  TransformersVLModel.encode (ModelPatcher-managed HF model, the runner)
  transformers hf    TransformersQwen3VL engine "hf" (the HF forward stopped early by hooks)
  baseline host      ComfyUI's own encode (clip.tokenize(..., images=[img]) + encode_from_tokens)
  baseline hf full   the common transformers way: full forward, output_hidden_states=True, logits

at 512², 1024², 1536² (layer -6, one image, the style-reference prompt), each with the compute roofline
(matmul + attention FLOPs of what the fast path computes / the bf16 matmul rate measured in this run).
Then images/s for a batch of 16 different 1024² references (encode_many vs looping the baselines),
the vision-tower share and SDPA back-ends, and (--profile) where the transformers path spends its time.

Run (GPU):   python bench/bench_encode.py --out $OUT/encode.json
Smoke (CPU): python bench/bench_encode.py --tiny --device cpu
Cold / warm (fresh processes: first encode, compile time with an empty and a warm inductor disk cache):
             python bench/bench_encode.py --cold-runs --sizes 1024 --out $OUT/cold.json
ComfyUI comes from --comfy, $COMFYUI_PATH, ./.comfy_host (a git-ignored copy carried to the GPU
machine) or $HOME/ComfyUI, in that order.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import REPO_ROOT, find_comfy, import_host, import_pack, native_qwen3vl_target  # noqa: F401
from cold_runs import cold_probe, cold_runs
from flops import encode_flops
from host_parts import host_parts_section, host_profile, process_costs, runner_of
PROMPT = "Describe the style, colours, lighting and composition of this image."

FULL_TEXT = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144,
                 rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                  "mrope_interleaved": True})
FULL_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                   temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=2560, in_channels=3,
                   deepstack_visual_indexes=[5, 11, 17], num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")
TINY_TEXT = dict(FULL_TEXT, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=2,
                 num_key_value_heads=1)
TINY_VISION = dict(FULL_VISION, depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256,
                   deepstack_visual_indexes=[0, 1])
SPECIALS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


# ------------------------------------------------------------------------------------------------ host

def tokenizer_dir(comfy_root: Path) -> Path:
    return comfy_root / "comfy" / "text_encoders" / "qwen25_tokenizer"


# ------------------------------------------------------------------------------------------------ models

def build_hf(comfy_root: Path, tiny: bool, device, dtype, seed: int = 0):
    """Random-init Qwen3VLForConditionalGeneration (real config unless tiny) on `device` + the Qwen tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir(comfy_root)), local_files_only=True)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIALS.items()}
    config = Qwen3VLConfig(text_config=dict(TINY_TEXT if tiny else FULL_TEXT),
                           vision_config=dict(TINY_VISION if tiny else FULL_VISION), tie_word_embeddings=True, **ids)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    with torch.no_grad():   # norms 1, everything else N(0, 0.02) (HF's own init; re-done to be sure on any version)
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.zero_()
    return model, tok


def build_native_clip(hf_model, tiny: bool, device, dtype):
    """ComfyUI's native Qwen3-VL CLIP whose parameters ARE the HF model's tensors (ComfyUI key names)."""
    import torch
    import comfy.sd
    import comfy.utils

    if tiny:
        sys.path.insert(0, str(REPO_ROOT))
        from tools import tiny_models

        model_type = tiny_models._tiny_native_model_type(TINY_TEXT["hidden_size"], TINY_TEXT["num_hidden_layers"])
    else:
        model_type = "qwen3vl_4b"
    width = hf_model.config.text_config.hidden_size
    target = native_qwen3vl_target(model_type, width, dtype)
    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(target, state_dict=[], model_options={"dtype": dtype, "load_device": device,
                                                                "offload_device": cpu, "initial_device": cpu})
    inner = getattr(clip.cond_stage_model, clip.cond_stage_model.clip)
    transformer = inner.transformer
    hf = dict(hf_model.named_parameters())
    shared = 0
    for name, _ in list(transformer.named_parameters()):
        src = ("model.language_model." + name[len("model."):]) if name.startswith("model.") else "model." + name
        comfy.utils.set_attr_param(transformer, name, hf[src])
        shared += 1
    for name, buf in list(transformer.named_buffers()):
        comfy.utils.set_attr_buffer(transformer, name, buf.to(device))
    return clip, shared


# ------------------------------------------------------------------------------------------------ timing

def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, reps: int, warmup: int = 2, keep: int = 2, make=None) -> dict:
    """Median wall time (ms) of fn() (each call synchronised) and the peak memory allocated during it. The last
    `keep` results stay alive, as ComfyUI's cache holds a node's previous output while the next is made (a result
    dropped at once would hand its memory, pages already mapped, to the next one). make: fn(make()) instead, make()
    outside the timing (a fresh input per call)."""
    import torch

    call = fn if make is None else (lambda: fn(make()))
    kept = collections.deque(maxlen=keep)
    for _ in range(warmup):
        kept.append(call())
    sync(device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    for _ in range(reps):
        arg = make() if make is not None else None
        t0 = time.perf_counter()
        kept.append(fn() if make is None else fn(arg))
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    out = {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        out["resident_gib"] = base / 2 ** 30
    return out


def measure_interleaved(fns: dict, device, reps: int, keep: int = 2) -> dict:
    """measure() of several rows in one round-robin (rep i of every row before rep i + 1 of any), so slow drift
    of the machine (clocks, other tenants, the host's caches) falls on all rows alike: {name: stats}. fns: name ->
    (fn, make): fn(make()), make() outside the timing."""
    kept = {n: collections.deque(maxlen=keep) for n in fns}
    for n, (fn, make) in fns.items():
        for _ in range(2):
            kept[n].append(fn(make()))
    sync(device)
    times = {n: [] for n in fns}
    for _ in range(reps):
        for n, (fn, make) in fns.items():
            arg = make()
            t0 = time.perf_counter()
            kept[n].append(fn(arg))
            sync(device)
            times[n].append(1e3 * (time.perf_counter() - t0))
    return {n: {"ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "reps": reps, "interleaved": True}
            for n, t in times.items()}


def matmul_peak(device, n: int = 8192, reps: int = 10) -> float:
    import torch

    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--comfy", default=None)
    ap.add_argument("--sizes", default="512,1024,1536")
    ap.add_argument("--layer", type=int, default=None, help="hidden layer (default -6; tiny: -2)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--host-reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batch-size-px", type=int, default=1024)
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables of the transformers paths")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: latency,batch,breakdown,hostparts,timeline,hostprofile")
    ap.add_argument("--fusion", default="auto", help="fusion mode of the fused rows (fusion.MODES)")
    ap.add_argument("--methods", default="", help="semicolon list: measure only these latency rows (default all)")
    ap.add_argument("--interleave", action="store_true",
                    help="latency rows measured in one round-robin (same-run ratios under drift; no host baseline)")
    ap.add_argument("--cold-runs", action="store_true", help="fresh-process first-encode figures (subprocesses)")
    ap.add_argument("--cold-probe", default=None, help=argparse.SUPPRESS)   # one fresh process of --cold-runs
    ap.add_argument("--cold-cases", default=None, help="with --cold-runs: comma list of COLD_CASES indices")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cold_runs:
        return cold_runs(args, __file__)

    comfy_root = find_comfy(args.comfy)
    import_host(comfy_root, cpu=args.device == "cpu")
    import torch
    import comfy.model_management as mm

    native_clip = import_pack("nodes.native_clip")
    transformers_model = import_pack("nodes.transformers_model")
    tq = import_pack("vl_core.encoders.transformers_qwen3vl")
    runner_mod = import_pack("vl_core.encoders.qwen3vl_runner")
    extract = import_pack("vl_core.extract")
    layout = import_pack("vl_core.layout")
    preprocess = import_pack("vl_core.preprocess")

    device = torch.device(args.device)
    if device.type == "cuda":
        device = mm.get_torch_device()      # cuda:N, as ComfyUI names it (torch.device("cuda") != "cuda:0")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"sizes": {}, "batch": {}, "checks": {}}
    t0 = time.perf_counter()
    hf_model, tok = build_hf(comfy_root, args.tiny, device, dtype)
    clip, shared = build_native_clip(hf_model, args.tiny, device, dtype)
    n_params = sum(p.numel() for p in hf_model.parameters())
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": importlib.import_module("transformers").__version__,
            "dtype": str(dtype), "params": n_params, "shared_tensors": shared, "comfy": str(comfy_root),
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}
    print(f"models built in {time.perf_counter() - t0:.1f}s: {info}", flush=True)
    fusion = import_pack("vl_core.encoders.fusion")
    if args.cold_probe:
        return cold_probe(args, native_clip, clip, fusion, device, PROMPT, sync)
    peak = matmul_peak(device)
    info["matmul_tflops"] = peak / 1e12
    print(f"bf16 8192^3 matmul: {peak / 1e12:.0f} TFLOP/s", flush=True)
    results["info"] = info

    native = native_clip.NativeQwen3VLEncoder(clip)
    native_eager = native_clip.NativeQwen3VLEncoder(clip, graphs=False)
    native_fused = native_clip.NativeQwen3VLEncoder(clip)
    native_fused_eager = native_clip.NativeQwen3VLEncoder(clip, graphs=False)
    host = native_clip.NativeQwen3VLEncoder(clip, engine="host")
    tr_enc = tq.TransformersQwen3VL(hf_model, tok, source="random-init Qwen3-VL-4B")
    tr = transformers_model.TransformersVLModel(tr_enc, load_device=device, offload_device=torch.device("cpu"))
    tr_eager = transformers_model.TransformersVLModel(
        tq.TransformersQwen3VL(hf_model, tok, source="random-init Qwen3-VL-4B", graphs=False),
        load_device=device, offload_device=torch.device("cpu"))
    tr_hf = tq.TransformersQwen3VL(hf_model, tok, source="random-init Qwen3-VL-4B", engine="hf")
    tr_hf.output_device = mm.intermediate_device()
    tr_fused = transformers_model.TransformersVLModel(tq.TransformersQwen3VL(hf_model, tok, source="random-init Qwen3-VL-4B"),
                                                      load_device=device, offload_device=torch.device("cpu"))
    tr_fused_eager = transformers_model.TransformersVLModel(
        tq.TransformersQwen3VL(hf_model, tok, source="random-init Qwen3-VL-4B", graphs=False),
        load_device=device, offload_device=torch.device("cpu"))
    for enc, mode in ((native, "off"), (native_eager, "off"), (tr, "off"), (tr_eager, "off"),
                      (native_fused, args.fusion), (native_fused_eager, "on"), (tr_fused, args.fusion),
                      (tr_fused_eager, "on")):      # "on": the compiled steps also without CUDA graphs
        runner_of(enc).fusion = fusion.Fusion(mode)
    L = native.num_layers
    layer = extract.resolve_layer(args.layer if args.layer is not None else (-2 if args.tiny else -6), L)
    print(f"layer {layer - L - 1} (= hidden_states[{layer}]) of {L}", flush=True)
    t1 = time.perf_counter()          # compile the fused steps now (background thread), so every row is steady
    native_fused.encode([torch.rand(*(2 * [64 if args.tiny else 1024]), 3)], PROMPT, [layer], "after_image")
    fusion.Fusion.wait()
    info["compile"] = dict(fusion.Fusion.status(), wall_s=time.perf_counter() - t1,
                           cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    print(f"fused steps: {info['compile']}", flush=True)

    def hf_full(image):
        """The common transformers way: full forward, every hidden state, logits."""
        pv, grid = preprocess.to_patches(image)
        grids = [grid]
        counts = [preprocess.image_tokens(image.shape[0], image.shape[1])]
        ids, _ = tr_hf.tokenize(PROMPT, 1, "after_image", counts)
        kw = dict(input_ids=ids[None].to(device), pixel_values=pv.to(device), image_grid_thw=torch.cat(grids).to(device),
                  output_hidden_states=True, use_cache=False)
        with torch.inference_mode():
            try:
                out = hf_model(**kw, mm_token_type_ids=(ids == tr_hf.image_pad_id)[None].int().to(device))
            except TypeError:
                out = hf_model(**kw)
            return out.hidden_states[layer].float().cpu(), out.logits.shape

    g = torch.Generator().manual_seed(1234)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.tiny:
        sizes = [min(s, 128) for s in sizes]

    methods = {
        "native fast": lambda im: native.encode([im], PROMPT, [layer], "after_image"),
        "native fast eager": lambda im: native_eager.encode([im], PROMPT, [layer], "after_image"),
        "transformers fast": lambda im: tr.encode([im], PROMPT, [layer], "after_image"),
        "transformers fast eager": lambda im: tr_eager.encode([im], PROMPT, [layer], "after_image"),
        "native fused": lambda im: native_fused.encode([im], PROMPT, [layer], "after_image"),
        "native fused eager": lambda im: native_fused_eager.encode([im], PROMPT, [layer], "after_image"),
        "transformers fused": lambda im: tr_fused.encode([im], PROMPT, [layer], "after_image"),
        "transformers fused eager": lambda im: tr_fused_eager.encode([im], PROMPT, [layer], "after_image"),
        "native fused, previous host path": lambda im: previous_host_path(
            native_fused, native_clip, tq, lambda: native_fused.encode([im], PROMPT, [layer], "after_image")),
        "native fused, float32 wire": lambda im: previous_host_path(
            native_fused, None, None, lambda: native_fused.encode([im], PROMPT, [layer], "after_image")),
        "transformers fused, previous host path": lambda im: previous_host_path(
            tr_fused, native_clip, tq, lambda: tr_fused.encode([im], PROMPT, [layer], "after_image")),
        "native fused, keys before the first launch": lambda im: keys_first(
            native_fused, lambda: native_fused.encode([im], PROMPT, [layer], "after_image")),
        "native fused, eager vision input": lambda im: with_eager_steps(
            ("patch_rows", "add_position"), lambda: native_fused.encode([im], PROMPT, [layer], "after_image")),
        "native fused, no prefetch": lambda im: without_prefetch(
            native_fused, lambda: native_fused.encode([im], PROMPT, [layer], "after_image")),
        "transformers fused, no prefetch": lambda im: without_prefetch(
            tr_fused, lambda: tr_fused.encode([im], PROMPT, [layer], "after_image")),
        "native fused" + SAME_IMAGE: lambda im: native_fused.encode([im], PROMPT, [layer], "after_image"),
        "transformers fused" + SAME_IMAGE: lambda im: tr_fused.encode([im], PROMPT, [layer], "after_image"),
        **{f"native fused, staging copy on {n or 'all'} threads": (lambda im, n=n: with_attrs(
            runner_of(native_fused).staging, lambda: native_fused.encode([im], PROMPT, [layer], "after_image"),
            copy_threads=n)) for n in (None, 1, 2, 8)},
        "transformers hf": lambda im: tr_hf.encode([im], PROMPT, [layer], "after_image"),
        "baseline host": lambda im: host.encode([im], PROMPT, [layer], "after_image"),
        "baseline hf full": hf_full,
    }
    if "latency" not in skip:
        for size in sizes:
            image = torch.rand(size, size, 3, generator=g)
            row = {}
            outs = {}
            chosen = [m.strip() for m in args.methods.split(";") if m.strip()]
            picked = {n: fn for n, fn in methods.items() if not chosen or n in chosen + ["native fast"]}
            fresh = loadimage_like(image)

            def make_for(name):     # each encode a new IMAGE (as LoadImage makes one), unless the row says otherwise
                return (lambda: image) if name.endswith(SAME_IMAGE) else fresh
            if args.interleave:     # one round-robin: every row sees the same machine drift (ComfyUI's slow
                slow = {n: picked.pop(n) for n in ("baseline host",) if n in picked}      # encoder after it)
                row.update(measure_interleaved({n: (fn, make_for(n)) for n, fn in picked.items()}, device, args.reps))
                outs.update({n: fn(image) for n, fn in picked.items()})
                picked = slow
            for name, fn in picked.items():
                reps = args.host_reps if name == "baseline host" else args.reps
                try:
                    row[name] = measure(fn, device, reps, make=make_for(name))
                    outs[name] = fn(image)
                except Exception as e:  # noqa: BLE001 - report and go on
                    row[name] = {"error": f"{type(e).__name__}: {e}"}
                print(f"{size}² {name:<18} {row[name]}", flush=True)
            if args.interleave:
                for name in row:
                    print(f"{size}² {name:<18} {row[name]}", flush=True)
            assert native.last_path == "fast", "native fast path fell back to the host encoder"
            emb = outs.get("native fast")
            n_tokens = emb.num_tokens if emb is not None else 0
            spec = native._spec
            grid = [(size // spec.patch_size, size // spec.patch_size)]
            fl = encode_flops(spec, grid, n_tokens, layer, vision_ffn=hf_model.config.vision_config.intermediate_size,
                                         text_ffn=hf_model.config.text_config.intermediate_size)
            fl_full = encode_flops(spec, grid, n_tokens, L, vision_ffn=hf_model.config.vision_config.intermediate_size,
                                              text_ffn=hf_model.config.text_config.intermediate_size)
            lm_head = 2 * n_tokens * spec.hidden * hf_model.config.text_config.vocab_size
            row["tokens"] = n_tokens
            row["flops"] = fl
            row["roofline_ms"] = 1e3 * fl["total"] / peak if peak == peak else None
            row["roofline_full_ms"] = 1e3 * (fl_full["total"] + lm_head) / peak if peak == peak else None
            if "native fast" in outs and "baseline host" in outs and "error" not in row["baseline host"]:
                row["rel_native_fast_vs_host"] = rel(outs["native fast"].hidden[layer], outs["baseline host"].hidden[layer])
            if "transformers fast" in outs and "transformers hf" in outs:
                row["rel_tr_fast_vs_hf"] = rel(outs["transformers fast"].hidden[layer], outs["transformers hf"].hidden[layer])
            for a, b in (("native fused", "native fast"), ("transformers fused", "transformers fast"),
                         ("native fused", "baseline host"), ("transformers fused", "transformers hf")):
                if a in outs and b in outs and hasattr(outs[b], "hidden"):
                    row[f"rel_{a}_vs_{b}".replace(" ", "_")] = rel(outs[a].hidden[layer], outs[b].hidden[layer])
            if "baseline hf full" in outs and "transformers hf" in outs:
                row["rel_hf_engine_vs_full"] = rel(outs["transformers hf"].hidden[layer], outs["baseline hf full"][0])
            results["sizes"][size] = row
            print(f"{size}²: {n_tokens} tokens, roofline {row['roofline_ms']} ms; checks "
                  f"{ {k: v for k, v in row.items() if k.startswith('rel_')} }", flush=True)

    if "breakdown" not in skip and (device.type == "cuda" or args.tiny):
        size = 1024 if not args.tiny else 128
        image = torch.rand(size, size, 3, generator=g)
        runner = native._fast_runner(1, 1, [(size, size)])
        bd = {}
        x = image.to(device)[None]
        for mode in runner_mod.SDPA_MODES[:4]:
            runner.sdpa = mode

            def vision_only():
                with torch.inference_mode(), runner_mod.sdpa_context(mode, device):
                    runner.vision(x)
            try:
                bd[f"vision sdpa={mode}"] = measure(vision_only, device, args.reps)
                bd[f"native encode sdpa={mode}"] = measure(
                    lambda: native.encode([image], PROMPT, [layer], "after_image"), device, args.reps)
            except Exception as e:  # noqa: BLE001
                bd[f"sdpa={mode}"] = {"error": f"{type(e).__name__}: {e}"}
        runner.sdpa = "auto"
        emb = native.encode([image], PROMPT, [layer], "after_image")
        before, text, after = extract.chat_pieces(PROMPT, 1, "after_image")
        ids, _ = layout.expand_image_pads(*layout.tokenize_chat(tok, before, text, after), native.image_pad_id,
                                          [emb.num_image_tokens])
        ids = ids.tolist()
        cache = runner.graphs
        for graphs in (True, False):
            runner.graphs = cache if graphs else None
            bd[f"runner.forward only, graphs={graphs}"] = measure(
                lambda: runner.forward(ids, native.image_pad_id, [x], [layer]), device, args.reps)
        runner.graphs = cache
        fused_runner = runner_of(native_fused)
        bd["runner.forward only, fused, graphs=True"] = measure(
            lambda: fused_runner.forward(ids, native.image_pad_id, [x], [layer]), device, args.reps)
        pv, grid = preprocess.to_patches(image)

        def hf_visual():
            with torch.inference_mode():
                hf_model.model.visual(pv.to(device, dtype), grid_thw=grid.to(device))
        try:
            bd["hf visual (transformers sdpa)"] = measure(hf_visual, device, args.reps)
        except Exception as e:  # noqa: BLE001
            bd["hf visual (transformers sdpa)"] = {"error": f"{type(e).__name__}: {e}"}
        for k, v in bd.items():
            print(f"breakdown {size}² {k:<28} {v}", flush=True)
        results["breakdown"] = bd

    if "batch" not in skip:
        size = args.batch_size_px if not args.tiny else 64
        images = [torch.rand(size, size, 3, generator=g) for _ in range(args.batch)]
        n = len(images)

        def loop(fn):
            return lambda: [fn(im) for im in images]

        batch_methods = {
            "native fast encode_many": lambda: native.encode_many(images, PROMPT, [layer], "after_image"),
            "native fast encode_many eager": lambda: native_eager.encode_many(images, PROMPT, [layer], "after_image"),
            "native fused encode_many": lambda: native_fused.encode_many(images, PROMPT, [layer], "after_image"),
            "transformers fast encode_many": lambda: tr.encode_many(images, PROMPT, [layer], "after_image"),
            "transformers fast encode_many eager": lambda: tr_eager.encode_many(images, PROMPT, [layer],
                                                                                 "after_image"),
            "native fast loop": loop(methods["native fast"]),
            "baseline host loop": loop(methods["baseline host"]),
            "baseline hf full loop": loop(methods["baseline hf full"]),
        }
        for name, fn in batch_methods.items():
            reps = 1 if "host" in name else 3
            try:
                r = measure(fn, device, reps, warmup=0 if "host" in name else 1)
                r["images_per_s"] = n / (r["ms"] / 1e3)
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {e}"}
            results["batch"][name] = r
            print(f"batch {n}x{size}² {name:<30} {r}", flush=True)
        many = native.encode_many(images[:4], PROMPT, [layer], "after_image")
        single = [native.encode([im], PROMPT, [layer], "after_image") for im in images[:4]]
        results["checks"]["encode_many_vs_single_max_rel"] = max(rel(a.hidden[layer], b.hidden[layer])
                                                                 for a, b in zip(many, single))
        print(f"encode_many vs single: max rel {results['checks']['encode_many_vs_single_max_rel']:.2e}", flush=True)

    if "hostparts" not in skip:
        results["process_costs"] = process_costs(device, runner_of(native_fused))
        print("process costs (ms):", results["process_costs"], flush=True)
        results["host_parts"] = host_parts_section(native_fused, tr_fused, native_clip, tq, layer, g,
                                                   1024 if not args.tiny else 64, args.reps, PROMPT)
    if "timeline" not in skip and device.type == "cuda":     # the GPU's own clock: DMA, idle time, spans
        from timeline import encode_timeline

        image = torch.rand(1024, 1024, 3, generator=g)
        results["timeline"] = {}
        chosen = [m.strip() for m in args.methods.split(";") if m.strip()]
        for name in ("native fused", "transformers fused", "native fused, no prefetch",
                     "native fused, keys before the first launch",
                     "native fused, eager vision input", "native fused, staging copy on all threads"):
            if chosen and name not in chosen:
                continue
            trace = str(Path(args.out).with_name(f"trace_{name.split(',')[0].replace(' ', '_')}.json")) \
                if args.out and name == "native fused" else None
            results["timeline"][name] = encode_timeline(methods[name], 5, trace, make=loadimage_like(image))
            print(f"timeline {name} (µs):", results["timeline"][name], flush=True)
    if "hostprofile" not in skip:      # where the rest of the host time goes, function by function
        image = torch.rand(*(2 * [1024 if not args.tiny else 64]), 3, generator=g)
        for name in ("native fused", "transformers fused"):
            host_profile(name, lambda: methods[name](image), args.reps)

    if args.profile:
        results["profile"] = profile(device, {"transformers hf (HF forward + hooks)": methods["transformers hf"],
                                              "native fast eager": methods["native fast eager"],
                                              "native fast (graph replay)": methods["native fast"],
                                              "native fused eager": methods["native fused eager"],
                                              "native fused (graph replay)": methods["native fused"]},
                                     torch.rand(1024 if not args.tiny else 64, 1024 if not args.tiny else 64, 3,
                                                generator=g))

    summary(results, layer - L - 1)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


def profile(device, fns: dict, image) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile

    out = {}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, fn in fns.items():
        fn(image)
        sync(device)
        with tprofile(activities=acts) as prof:
            fn(image)
            sync(device)
        ka = prof.key_averages()
        sync_names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::item",
                      "aten::_local_scalar_dense", "cudaMemcpy", "cudaEventSynchronize")
        syncs = {e.key: e.count for e in ka if e.key in sync_names}
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        kinds = kernel_kinds(prof)
        print(f"\n===== profile: {name} (1024², one encode) =====\n"
              f"sync / copy events: {syncs}\nGPU time by kind (ms, kernels): {kinds}", flush=True)
        print(ka.table(sort_by=key, row_limit=40, max_name_column_width=90), flush=True)
        print(ka.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60), flush=True)
        out[name] = {"syncs": syncs, "kinds": kinds}
    return out


def to_outputs_host_widen(results: dict, device) -> dict:
    """weights.to_outputs before 2026-12-03 (third round), for a same-run comparison: a bf16 DMA into a pinned
    staging buffer, fresh pageable float32 outputs touched while the GPU computes, the widening copy on the host."""
    import torch

    staged, out = {}, {}
    with torch.inference_mode(False):
        for k, t in results.items():
            staged[k] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            staged[k].copy_(t, non_blocking=True)
            out[k] = torch.empty(t.shape, dtype=torch.float32)
            out[k].view(-1)[::1024].zero_()
        torch.cuda.current_stream().synchronize()
        for k in results:
            out[k].copy_(staged[k])
    return out


def with_attrs(obj, fn, **attrs):
    """fn() with these instance attributes set on obj (removed after)."""
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        return fn()
    finally:
        for k in attrs:
            delattr(obj, k)


def previous_host_path(enc, native_clip, tq, fn):
    """fn() with the image on the wire as float32 and, where the modules are given, the previous to_outputs (host
    widening): the host path of the previous round, measured beside today's."""
    runner = runner_of(enc)
    mods = [m for m in (native_clip, tq) if m is not None and runner.device.type == "cuda"]
    saved = [m.to_outputs for m in mods]
    for m in mods:
        m.to_outputs = to_outputs_host_widen
    try:
        return with_attrs(runner, fn, IMAGE_WIRE_DTYPE=None)     # (over the class's float16)
    finally:
        for m, f in zip(mods, saved):
            m.to_outputs = f


def without_prefetch(enc, fn):
    """fn() with the staging copy made inside the forward, after the encode's host work (the previous order)."""
    import contextlib

    return with_attrs(runner_of(enc), fn, prefetch=lambda images: contextlib.nullcontext())


def keys_first(enc, fn):
    """fn() with the language model's graph key built before the vision graph launches (as the one-graph forward
    of the previous round did): what launching the vision graph first saves, in the same run."""
    runner = runner_of(enc)
    split = type(runner)._replay_parts

    def replay_parts(vkey, ids, wires, images, wanted, fused):
        runner._lm_key(ids, wires, wanted, fused)
        return split(runner, vkey, ids, wires, images, wanted, fused)

    return with_attrs(runner, fn, _replay_parts=replay_parts)     # (an instance attribute over the method)


SAME_IMAGE = ", same image tensor again"     # rows fed one image tensor over and over (earlier rounds' figures)


def loadimage_like(image):
    """make() for measure(): a new IMAGE per call, built as ComfyUI's LoadImage builds one (numpy uint8 → float32
    / 255, one thread) from `image`'s pixels: what a new reference looks like to the encode, just written by the
    node before it. (Re-encoding one tensor instead leaves it idle in memory between encodes, out of the CPU's
    caches: its staging copy is that case, a prompt changed over a loaded image.)"""
    import numpy as np
    import torch

    px = (image * 255).round().to(torch.uint8).numpy()
    return lambda: torch.from_numpy(px.astype(np.float32) / 255.0)


def with_eager_steps(names, fn):
    """fn() with these fused steps' eager twins in the compiled set (the others compiled)."""
    fusion = import_pack("vl_core.encoders.fusion")
    compiled = fusion._COMPILER.compiled()
    saved = {n: getattr(compiled, n) for n in names}
    for n in names:
        setattr(compiled, n, fusion.STEPS[n])
    try:
        return fn()
    finally:
        for n, f in saved.items():
            setattr(compiled, n, f)


KERNEL_KINDS = (("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
                ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
                ("copy", ("memcpy", "memset")))


def kernel_kinds(prof) -> dict:
    """GPU time (ms) and kernel count per kind (gemm / attention / copy / elementwise = the rest) of a profile."""
    import torch

    out: dict = {}
    for e in prof.events():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(w in name for w in keys)), "elementwise")
        ms, n = out.get(kind, (0.0, 0))
        out[kind] = (ms + getattr(e, "device_time", getattr(e, "cuda_time", 0.0)) / 1e3, n + 1)
    return {k: (round(ms, 3), n) for k, (ms, n) in sorted(out.items())}


def summary(results: dict, layer_neg: int) -> None:
    info = results["info"]
    print(f"\n==== VL encode, layer {layer_neg}, {info['device']}, torch {info['torch']}, transformers "
          f"{info['transformers']}, {info['dtype']}, matmul {info['matmul_tflops']:.0f} TFLOP/s ====")
    names = ["native fused", "native fused eager", "native fast", "native fast eager", "transformers fused",
             "transformers fused eager", "transformers fast", "transformers fast eager", "transformers hf",
             "baseline host", "baseline hf full"]
    print(f"{'size':>6} {'tokens':>6} {'roofline':>9} " + " ".join(f"{n:>18}" for n in names))
    for size, row in results["sizes"].items():
        cells = []
        for n in names:
            r = row.get(n, {})
            cells.append(f"{r['ms']:>8.1f}ms {r.get('peak_gib', float('nan')):>5.1f}G" if "ms" in r else f"{'err':>18}")
        roof = row.get("roofline_ms")
        print(f"{size:>6} {row.get('tokens', 0):>6} {'-' if roof is None else f'{roof:.1f}ms':>9} " + " ".join(cells))
        base_h, base_f = row.get("baseline host", {}).get("ms"), row.get("baseline hf full", {}).get("ms")
        for n in ("native fused", "native fast", "native fast eager", "transformers fused", "transformers fast",
                  "transformers fast eager"):
            ms = row.get(n, {}).get("ms")
            if ms and base_h and base_f:
                print(f"{'':>6} {n}: x{base_h / ms:.1f} vs host, x{base_f / ms:.1f} vs hf full, "
                      f"{ms / roof if roof else float('nan'):.2f}x roofline")
    if results["batch"]:
        print("batch:")
        for n, r in results["batch"].items():
            print(f"  {n:<32} {r.get('images_per_s', float('nan')):>8.1f} img/s  peak {r.get('peak_gib', float('nan')):.1f} GiB")


if __name__ == "__main__":
    sys.exit(main())
