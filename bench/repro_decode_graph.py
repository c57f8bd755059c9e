"""Why "every VAE decode leaves ≈ 11 GiB allocated": the autograd graph, when the decode runs outside inference mode.

ComfyUI builds its VAE with parameters that require grad. Its executor runs every node under
``torch.inference_mode()`` (execution.py), so a VAEDecode in a real server records nothing. The old
bench_workflow.py called ``vae.decode`` directly with grad enabled: the decoded IMAGE then carries a
``grad_fn`` whose saved tensors are the decoder's activations — (1, 256, 1024, 1024) and (1, 512, 512, 512)
bf16 maps at 1024² — alive for as long as the image is referenced, unreachable from any Python object
(gc.get_referrers finds nothing: the autograd graph holds them in C++).

This script decodes one latent three ways and reports what stays allocated after the call returns:
grad enabled (the old bench), inference mode (what ComfyUI's executor does) and grad enabled then
``del image``. On CUDA the figure is torch.cuda.memory_allocated; on the CPU it counts the large tensors
made during the decode that are still alive (weak references recorded by a dispatch mode).

Run (GPU):   python bench/repro_decode_graph.py --side 1024
Smoke (CPU): python bench/repro_decode_graph.py --device cpu --side 192
"""
from __future__ import annotations

import argparse
import gc
import sys
import weakref

import common


def build_vae(device):
    import torch
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    dd = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    model = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dd},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dd})
    torch.manual_seed(0)
    sd = {k: (v.detach() * 0.0 + torch.randn_like(v) * 0.02) for k, v in model.state_dict().items()}
    return comfy.sd.VAE(sd=sd, device=device)


class LiveTensors:
    """Weak references to the large tensors created while active (CPU: what stays alive afterwards)."""

    def __init__(self, min_numel: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        refs = self.refs = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for o in out if isinstance(out, (tuple, list)) else (out,):
                    if hasattr(o, "numel") and o.numel() >= min_numel:
                        try:
                            refs.append(weakref.ref(o))
                        except TypeError:
                            pass
                return out

        self.mode = Record()

    def alive_bytes(self) -> int:
        gc.collect()
        seen, total = set(), 0
        for r in self.refs:
            t = r()
            if t is not None and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total


def measure(vae, latent, device, how: str) -> tuple[float, bool]:
    """(GiB still allocated by the decode after it returned, whether the image has a grad_fn)."""
    import torch

    cuda = device.type == "cuda"
    live = LiveTensors(min_numel=1 << 16)
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    ctx = torch.inference_mode() if how == "inference_mode" else torch.enable_grad()
    with ctx:
        if cuda:
            image = vae.decode(latent)
        else:
            with live.mode:
                image = vae.decode(latent)
    has_graph = image.grad_fn is not None
    if how == "grad_then_del":
        del image
        image = None
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) - before - (image.numel() * image.element_size()
                                                               if image is not None and image.is_cuda else 0)
    else:
        out_bytes = 0 if image is None else image.untyped_storage().nbytes()
        held = live.alive_bytes() - out_bytes
    del image
    gc.collect()
    return held / 2 ** 30, has_graph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--side", type=int, default=1024, help="image side in pixels (latent side × 8)")
    ap.add_argument("--comfy", default=None)
    args = ap.parse_args(argv)
    common.import_host(common.find_comfy(args.comfy), cpu=args.device == "cpu")
    import torch
    import comfy.model_management as mm

    device = mm.get_torch_device() if args.device != "cpu" else torch.device("cpu")
    vae = build_vae(device)
    latent = torch.randn(1, 16, args.side // 8, args.side // 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():   # warm-up (loads the VAE, kernels); no_grad, not inference mode: the weights it
        vae.decode(latent)  # moves to the device must stay usable by the grad-enabled case below
    print(f"VAE decode {args.side}², {device}: memory still held by the decode after it returned")
    for how in ("grad_enabled", "inference_mode", "grad_then_del"):
        gib, graph = measure(vae, latent, device, how)
        print(f"  {how:<15} {gib:8.3f} GiB   image has grad_fn: {graph}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
