"""The style-reference workflow at full size: wall time per stage and peak VRAM, VL offloading off vs on.

Random-init, real-architecture models in bf16, created on the GPU and then handed to ComfyUI's model
management on the CPU (as after loading checkpoints): Z-Image Turbo's DiT
(comfy.supported_models.ZImage with the config ComfyUI detects for it, 6.15B), Z-Image's Qwen3-4B text
encoder, the native Qwen3-VL-4B (comfy.text_encoders.qwen3vl) and the 16-channel Flux VAE. The stages
run through the same code as the shipped workflow's nodes:

  text_encode   CLIPTextEncode's calls (clip.tokenize + encode_from_tokens_scheduled)
  vl_encode     ZImageVL_Encode.execute (layer -6, 1024² reference, offload_after_encode off / on)
  blend         ZImageVL_EmbeddingBlend.execute (alpha 0.3, pool, global)
  sample        KSampler's call: comfy.sample.sample, 8 steps res_multistep, CFG 1, shift 3, 1024²
  decode        VAEDecode's call (vae.decode)

Reported: per-stage wall time (model loads included: ComfyUI loads each model when a stage needs it)
and peak allocated VRAM (torch.cuda.max_memory_allocated, reset at each stage), which models ComfyUI
holds during sampling, and the whole-workflow peak. "isolated" runs each stage alone from an empty GPU
(its own requirement); "offload off/on" runs the workflow twice in a row (cold: all models in RAM;
warm: what ComfyUI kept loaded from the cold run).

Run (GPU):   python bench/bench_workflow.py --out $OUT/workflow.json [--card-gb 24]
Smoke (CPU): python bench/bench_workflow.py --tiny --device cpu
--card-gb N makes ComfyUI treat the card as an N GiB one (--reserve-vram = total - N), to see what its
own memory management does on the 12-24 GB cards users have.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("zimage_vl_bench_encode", HERE / "bench_encode.py")
be = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(be)

PROMPT = "a lighthouse on a rocky cliff above a stormy sea at dusk, warm light in the windows, seagulls, dramatic clouds"
VL_PROMPT = "Describe the style, colours, lighting and composition of this image."
ZIMAGE = common.ZIMAGE_CONFIG
TINY_ZIMAGE = dict(ZIMAGE, dim=256, n_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=256)
STAGES = ("text_encode", "vl_encode", "blend", "sample", "decode")


# ------------------------------------------------------------------------------------------------ models

def fill_(module, seed: int, device) -> None:
    """Matrices N(0, 1/sqrt(fan_in)) (embeddings N(0, 0.02)), norm scales 1, other vectors 0; drawn on `device`
    (and copied into parameters that live elsewhere, e.g. a text encoder built in host memory)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if param.device.type == "meta":
                raise RuntimeError(f"{name} is on the meta device")
            p = param if param.device == torch.device(device) else torch.empty_like(param, device=device)
            if "pad_token" in name:
                p.normal_(0.0, 1.0, generator=gen)
            elif p.ndim >= 2:
                std = 0.02 if "embed" in name else 1.0 / math.sqrt(max(1, p.numel() // p.shape[0]))
                p.normal_(0.0, std, generator=gen)
            elif p.ndim == 1 and ("norm" in name or name.endswith("scale")) and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
            if p is not param:
                param.copy_(p)


# host_loader=True (bench_server.py's loader nodes): leave each model as ComfyUI's own loaders do, weights in
# host memory and the patcher class the server chose (comfy.model_patcher.CoreModelPatcher: the dynamic-VRAM
# patcher when comfy-aimdo is active). False (this script): the legacy ModelPatcher, weights on `device`.

def build_dit(tiny: bool, device, dtype, host_loader: bool = False):
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.ZImage(dict(TINY_ZIMAGE if tiny else ZIMAGE))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device=device)
    fill_(model.diffusion_model, 0, device)
    model.diffusion_model.to(device=device, dtype=dtype)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    import comfy.model_management as mm

    offload = mm.unet_offload_device()
    if host_loader:
        model.to(offload)
        return comfy.model_patcher.CoreModelPatcher(model, load_device=device, offload_device=offload), params
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload), params


def build_clip(target, device, dtype, seed: int, model_options: dict | None = None, host_loader: bool = False):
    import torch
    import comfy.sd

    cpu = torch.device("cpu")
    opts = {"dtype": dtype, "load_device": device, "offload_device": cpu, "initial_device": cpu if host_loader else device}
    opts.update(model_options or {})
    clip = comfy.sd.CLIP(target, state_dict=[], model_options=opts, disable_dynamic=not host_loader)
    fill_(clip.cond_stage_model, seed, device)
    return clip


def build_text_encoder(tiny: bool, device, dtype, host_loader: bool = False):
    import comfy.supported_models_base
    import comfy.text_encoders.z_image as z_image

    target = comfy.supported_models_base.ClipTarget(z_image.ZImageTokenizer, z_image.te(dtype_llama=dtype))
    opts = {"qwen3_4b_model_config": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                                      "num_attention_heads": 2, "num_key_value_heads": 1}} if tiny else {}
    return build_clip(target, device, dtype, 1, opts, host_loader)


def build_vl(tiny: bool, device, dtype, host_loader: bool = False):

    if tiny:
        sys.path.insert(0, str(common.REPO_ROOT))
        from tools import tiny_models

        model_type = tiny_models._tiny_native_model_type(256, 8)
    else:
        model_type = "qwen3vl_4b"
    width = 256 if tiny else 2560
    return build_clip(common.native_qwen3vl_target(model_type, width, dtype), device, dtype, 2, host_loader=host_loader)


def build_vae(device):
    import torch
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    dd = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device(device):
        model = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dd},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dd})
    model.to(torch.float32)
    fill_(model, 3, device)
    sd = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    del model
    return comfy.sd.VAE(sd=sd)


# ------------------------------------------------------------------------------------------------ workflow

class Workflow:
    def __init__(self, tiny: bool, device, dtype):
        import torch

        self.device, self.dtype, self.tiny = device, dtype, tiny
        t0 = time.perf_counter()
        self.dit, self.dit_params = build_dit(tiny, device, dtype)
        self.te = build_text_encoder(tiny, device, dtype)
        self.vl = build_vl(tiny, device, dtype)
        self.vae = build_vae(device)
        self.build_s = time.perf_counter() - t0
        self.model = self.aura_shift(self.dit, 3.0)
        self.encode_node = common.import_pack("nodes.encode").VLEncode
        self.blend_node = common.import_pack("nodes.blend").EmbeddingBlend
        g = torch.Generator().manual_seed(7)
        side = 128 if tiny else 1024
        self.image = torch.rand(1, side, side, 3, generator=g)
        self.latent_side = side // 8
        self.noise = torch.randn(1, 16, self.latent_side, self.latent_side, generator=g)

    @staticmethod
    def aura_shift(model, shift: float):
        """ModelSamplingAuraFlow(shift) as comfy_extras/nodes_model_advanced.py does it."""
        import comfy.model_sampling

        m = model.clone()

        class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
            pass

        sampling = ModelSamplingAdvanced(model.model.model_config)
        sampling.set_parameters(shift=shift, multiplier=1.0)
        m.add_object_patch("model_sampling", sampling)
        return m

    # stages: each takes and returns the workflow state dict
    def text_encode(self, st):
        tokens = self.te.tokenize(PROMPT)
        st["cond"] = self.te.encode_from_tokens_scheduled(tokens)

    def vl_encode(self, st):
        out = self.encode_node.execute(image=self.image, prompt=VL_PROMPT, layers="-2" if self.tiny else "-6",
                                       token_mode="full", placement="after_image", max_image_tokens=1024,
                                       resize="fit_budget", outlier_threshold=10.0, outlier_mode="none", clip=self.vl,
                                       offload_after_encode=st["offload"])
        st["vl"] = out.args[0]

    def blend(self, st):
        import torch

        if "cond" not in st:
            st["cond"] = [[torch.randn(1, 40, 256 if self.tiny else 2560), {"pooled_output": None}]]
        pos = self.blend_node.execute(conditioning=st["cond"], vl_embeds=st["vl"], alpha=0.3, mode="linear",
                                      length="pool", normalize="global", token_budget=0).args[0]
        st["positive"] = pos
        st["negative"] = [[torch.zeros_like(c), {k: (torch.zeros_like(v) if torch.is_tensor(v) else v)
                                                 for k, v in d.items()}] for c, d in st["cond"]]

    def sample(self, st):
        import torch
        import comfy.sample

        if "positive" not in st:
            width = 256 if self.tiny else 2560
            c = torch.randn(1, 40, width)
            st["positive"], st["negative"] = [[c, {}]], [[torch.zeros_like(c), {}]]
        latent = torch.zeros(1, 16, self.latent_side, self.latent_side)
        latent = comfy.sample.fix_empty_latent_channels(self.model, latent)
        st["loaded_during_sampling"] = None

        def probe(executor, *a, **k):
            out = executor(*a, **k)
            st["loaded_during_sampling"] = loaded_models()
            return out

        m = self.model.clone()
        m.add_wrapper_with_key("prepare_sampling", "bench_probe", probe)
        st["samples"] = comfy.sample.sample(m, self.noise, 4 if self.tiny else 8, 1.0, "res_multistep", "simple",
                                            st["positive"], st["negative"], latent, denoise=1.0, seed=42,
                                            disable_pbar=True)

    def decode(self, st):
        import torch

        samples = st.get("samples")
        if samples is None:
            samples = torch.randn(1, 16, self.latent_side, self.latent_side)
        st["image"] = self.vae.decode(samples)

    def run(self, offload: bool, stages=STAGES, state=None) -> dict:
        import torch

        st = {"offload": offload} if state is None else state
        rows = {}
        for name in stages:
            be.sync(self.device)
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
                start_alloc = torch.cuda.memory_allocated(self.device)
            t0 = time.perf_counter()
            with torch.inference_mode():   # as ComfyUI's executor runs every node (see repro_decode_graph.py)
                getattr(self, name)(st)
            be.sync(self.device)
            rows[name] = {"ms": 1e3 * (time.perf_counter() - t0)}
            if cuda:
                rows[name].update(peak_gib=torch.cuda.max_memory_allocated(self.device) / 2 ** 30,
                                  start_gib=start_alloc / 2 ** 30,
                                  end_gib=torch.cuda.memory_allocated(self.device) / 2 ** 30)
            rows[name]["loaded_after"] = loaded_models()
        out = {"stages": rows, "total_ms": sum(r["ms"] for r in rows.values()),
               "peak_gib": max((r.get("peak_gib", float("nan")) for r in rows.values()), default=float("nan")),
               "loaded_during_sampling": st.get("loaded_during_sampling"),
               "finite": bool(torch.isfinite(st["image"]).all()) if "image" in st else None}
        return out


def loaded_models() -> list[str]:
    import comfy.model_management as mm

    out = []
    for lm in mm.current_loaded_models:
        p = lm.model
        if p is None:
            continue
        names = [c.__name__ for c in type(p.model).__mro__]
        kind = ("qwen3vl" if any(n.startswith("Qwen3VL") for n in names) else
                "text_encoder" if getattr(p, "is_clip", False) else
                "dit" if hasattr(p.model, "diffusion_model") else
                "vae" if any("Autoencod" in n for n in names) else type(p.model).__name__)
        out.append(f"{kind}:{p.loaded_size() / 2 ** 30:.1f}G")
    return sorted(out)


def unload_all(device):
    import torch
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--comfy", default=None)
    ap.add_argument("--card-gb", type=float, default=None, help="make ComfyUI treat the GPU as one of N GiB")
    ap.add_argument("--skip-isolated", action="store_true", help="skip the per-stage isolated runs")
    ap.add_argument("--offload", choices=("both", "off", "on"), default="both",
                    help="which offload_after_encode settings to run the workflow with")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    reserve = None
    if args.card_gb is not None and args.device != "cpu":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        reserve = max(0.0, total - args.card_gb)
    comfy_root = common.find_comfy(args.comfy)
    common.import_host(comfy_root, cpu=args.device == "cpu", reserve_vram_gb=reserve)
    import torch
    import comfy.model_management as mm

    device = torch.device(args.device)
    if device.type == "cuda":
        device = mm.get_torch_device()      # cuda:N: ComfyUI matches loaded models by this exact device
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    wf = Workflow(args.tiny, device, dtype)
    unload_all(device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dit_params": wf.dit_params, "build_s": wf.build_s,
            "card_gb": args.card_gb, "reserve_vram_gb": reserve,
            "vram_state": str(mm.vram_state), "resident_after_build_gib":
                torch.cuda.memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}
    print(f"built in {wf.build_s:.1f}s: {info}", flush=True)

    results = {"info": info}
    wf.run(True)                          # warm-up (kernels, allocator, cuBLAS/cuDNN handles)
    unload_all(device)
    iso = {}
    for name in (() if args.skip_isolated else STAGES):   # each stage alone from an empty GPU: its own requirement
        unload_all(device)
        st = {"offload": True}
        if name in ("blend", "sample", "decode"):
            for prev in STAGES[:STAGES.index(name)]:
                getattr(wf, prev)(st)
            unload_all(device)
        iso[name] = wf.run(True, stages=(name,), state=st)["stages"][name]
        print(f"isolated {name:<12} {iso[name]}", flush=True)
    results["isolated"] = iso
    for offload in {"both": (False, True), "off": (False,), "on": (True,)}[args.offload]:
        unload_all(device)
        for run in ("cold", "warm"):
            r = wf.run(offload)
            results[f"offload {'on' if offload else 'off'} {run}"] = r
            print(f"offload {'on ' if offload else 'off'} {run}: total {r['total_ms']:.0f} ms, peak {r['peak_gib']:.2f} GiB, "
                  f"during sampling {r['loaded_during_sampling']}", flush=True)
            for name, row in r["stages"].items():
                print(f"    {name:<12} {row}", flush=True)
    summary(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


def summary(results: dict) -> None:
    info = results["info"]
    iso = results["isolated"]
    max_stage = max((r.get("peak_gib", float("nan")) for r in iso.values()), default=float("nan"))
    card = f", ComfyUI told the card has {info['card_gb']:.0f} GiB" if info.get("card_gb") else ""
    print(f"\n==== style-reference workflow, 1024², 8 steps, {info['device']}{card} ====")
    runs = [k for k in results if k.startswith("offload")]
    print(f"{'stage':<12} {'isolated':>16} " + " ".join(f"{k:>22}" for k in runs))
    for name in STAGES:
        cells = [f"{results[k]['stages'][name]['ms']:>9.0f}ms {results[k]['stages'][name].get('peak_gib', float('nan')):>6.2f}G"
                 for k in runs]
        r = iso.get(name, {})
        print(f"{name:<12} {r.get('ms', float('nan')):>7.0f}ms {r.get('peak_gib', float('nan')):>6.2f}G " +
              " ".join(f"{c:>22}" for c in cells))
    print(f"{'total/peak':<12} {'':>16} " + " ".join(f"{results[k]['total_ms']:>9.0f}ms {results[k]['peak_gib']:>6.2f}G"
                                                 for k in runs))
    for k in runs:
        r = results[k]
        ok = r["peak_gib"] <= 1.1 * max_stage
        print(f"{k}: peak {r['peak_gib']:.2f} GiB vs max isolated stage {max_stage:.2f} GiB (x{r['peak_gib'] / max_stage:.2f}, "
              f"target <= x1.10: {'MET' if ok else 'MISSED'}); during sampling: {r['loaded_during_sampling']}")


if __name__ == "__main__":
    sys.exit(main())
