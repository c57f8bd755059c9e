"""The encode's kernels at their real shapes, variants side by side: GEMMs, attention back-ends, fused steps.

A 1024² Qwen3-VL-4B encode runs its language model on ≈ 1050 tokens, so its q/k/v (N = 4096 / 1024 / 1024)
and gate/up (N = 9728 ×2) GEMMs fill the GPU's SMs in awkward waves: separate, concatenated and on concurrent
streams. Attention: SDPA's back-ends for the vision tower (4096 tokens, head dim 64) and the language model
(causal, grouped-query, head dim 128). The q/k norm + RoPE step: the eager twin's op order compiled as is, and
its functional form (fusion.py). Each variant is timed as a replayed CUDA graph (no launch cost) in one
process. GPU only.

    python3 bench/kernel_shapes.py [--tokens 1050,1152] [--vision] [--autotune] [--reps 200] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def graph_ms(fn, reps: int) -> float:
    """GPU ms per call of fn, captured 10× into one CUDA graph and replayed `reps` // 10 times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps // 10):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps // 10 * 10)


def concurrent(fns):
    """Run fns[0] on the current stream and the others on side streams (joined back): one fork/join."""
    side = [torch.cuda.Stream() for _ in fns[1:]]

    def run():
        main = torch.cuda.current_stream()
        for st in side:
            st.wait_stream(main)
        for st, f in zip(side, fns[1:]):
            with torch.cuda.stream(st):
                f()
        fns[0]()
        for st in side:
            main.wait_stream(st)
    return run


def groups(m: int, d: int, heads: int, kv: int, hd: int, ffn: int, dev, dt):
    x = torch.randn(m, d, device=dev, dtype=dt)
    xf = torch.randn(m, ffn, device=dev, dtype=dt)
    xo = torch.randn(m, heads * hd, device=dev, dtype=dt)

    def w(n, k=d):
        return torch.randn(n, k, device=dev, dtype=dt) * 0.02

    wq, wk, wv, wg, wu = w(heads * hd), w(kv * hd), w(kv * hd), w(ffn), w(ffn)
    wo, wd = w(d, heads * hd), w(d, ffn)
    wqkv, wgu, wkv = torch.cat([wq, wk, wv]), torch.cat([wg, wu]), torch.cat([wk, wv])
    lin = F.linear
    return {
        "q": ([lambda: lin(x, wq)], m * d * heads * hd),
        "k": ([lambda: lin(x, wk)], m * d * kv * hd),
        "q,k,v separate": ([lambda: lin(x, wq), lambda: lin(x, wk), lambda: lin(x, wv)], m * d * (heads + 2 * kv) * hd),
        "qkv concatenated": ([lambda: lin(x, wqkv)], m * d * (heads + 2 * kv) * hd),
        "q ‖ k ‖ v streams": ([concurrent([lambda: lin(x, wq), lambda: lin(x, wk), lambda: lin(x, wv)])],
                              m * d * (heads + 2 * kv) * hd),
        "q ‖ kv(concat) streams": ([concurrent([lambda: lin(x, wq), lambda: lin(x, wkv)])], m * d * (heads + 2 * kv) * hd),
        "gate,up separate": ([lambda: lin(x, wg), lambda: lin(x, wu)], 2 * m * d * ffn),
        "gate‖up concatenated": ([lambda: lin(x, wgu)], 2 * m * d * ffn),
        "gate ‖ up streams": ([concurrent([lambda: lin(x, wg), lambda: lin(x, wu)])], 2 * m * d * ffn),
        "o_proj": ([lambda: lin(xo, wo)], m * heads * hd * d),
        "down_proj": ([lambda: lin(xf, wd)], m * ffn * d),
    }


def attention(m: int, vision_tokens: int, dev, dt):
    """name -> (fn, flops) per SDPA back-end: the vision tower's and the language model's attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    vq, vk, vv = (torch.randn(1, vision_tokens, 16, 64, device=dev, dtype=dt).transpose(1, 2) for _ in range(3))
    lq = torch.randn(1, m, 32, 128, device=dev, dtype=dt).transpose(1, 2)
    lk, lv = (torch.randn(1, m, 8, 128, device=dev, dtype=dt).transpose(1, 2) for _ in range(2))
    out = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def vis(b=backend):
            with sdpa_kernel([b]):
                F.scaled_dot_product_attention(vq, vk, vv)

        def lm(b=backend):
            with sdpa_kernel([b]):
                F.scaled_dot_product_attention(lq, lk, lv, is_causal=True, enable_gqa=True)

        out[f"vision attention {name}"] = (vis, 4 * vision_tokens ** 2 * 64 * 16)
        out[f"LM attention {name}"] = (lm, 4 * m * m * 128 * 32 / 2)   # causal: half the scores
    return out


def qk_norm_rope_forms(m: int, dev, dt):
    """The q/k norm + RoPE step compiled from the eager twin and from its functional form (fused_steps.py)."""
    from common import import_pack

    fusion = import_pack("vl_core.encoders.fused_steps")
    q, k = torch.randn(m, 32, 128, device=dev, dtype=dt), torch.randn(m, 8, 128, device=dev, dtype=dt)
    qw, kw = torch.rand(128, device=dev, dtype=dt), torch.rand(128, device=dev, dtype=dt)
    cos, sin = torch.randn(m, 1, 128, device=dev, dtype=dt), torch.randn(m, 1, 128, device=dev, dtype=dt)
    out = {}
    for name, fn in (("eager twin", fusion.qk_norm_rope), ("eager twin, compiled", torch.compile(fusion.qk_norm_rope)),
                     ("fused form, compiled", torch.compile(fusion.COMPILED_FORMS.get("qk_norm_rope",
                                                                                       fusion.qk_norm_rope)))):
        out[f"qk_norm_rope {name}"] = ((lambda f=fn: f(q, k, qw, kw, 1e-6, 1e-6, cos, sin)), 0)
    return out


def autotuned(m: int, d: int, heads: int, kv: int, hd: int, ffn: int, dev, dt):
    """name -> (fn, macs): the language model's four GEMMs as inductor max-autotune picks them (its Triton
    templates benchmarked against cuBLAS at this exact shape)."""
    x, xf, xo = (torch.randn(m, k, device=dev, dtype=dt) for k in (d, ffn, heads * hd))
    lin = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    out = {}
    for name, a, n in (("qkv", x, (heads + 2 * kv) * hd), ("gate‖up", x, 2 * ffn), ("o_proj", xo, d), ("down_proj", xf, d)):
        w = torch.randn(n, a.shape[1], device=dev, dtype=dt) * 0.02
        lin(a, w)
        out[f"autotuned {name}"] = ((lambda a=a, w=w: lin(a, w)), m * a.shape[1] * n)
    return out


def memsets(dev, dt) -> dict:
    """name -> (memsets, kernels) one replay of a one-op CUDA graph launches: which library calls bring the
    memset nodes the encode's graphs hold (each costs ≈ 4 µs of graph time with its dependency gaps)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    x, xl = torch.randn(4096, 1024, device=dev, dtype=dt), torch.randn(1047, 2560, device=dev, dtype=dt)
    w3, b3 = torch.randn(3072, 1024, device=dev, dtype=dt) * 0.02, torch.zeros(3072, device=dev, dtype=dt)
    w4, b4 = torch.randn(4096, 1024, device=dev, dtype=dt) * 0.02, torch.zeros(4096, device=dev, dtype=dt)
    wgu = torch.randn(19456, 2560, device=dev, dtype=dt) * 0.02
    qkv = torch.randn(4096, 3, 16, 64, device=dev, dtype=dt)
    q, k, v = (qkv[:, i].transpose(0, 1)[None] for i in range(3))          # strided views, as the runner's
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    lq = torch.randn(1, 1047, 32, 128, device=dev, dtype=dt).transpose(1, 2)
    lk, lv = (torch.randn(1, 1047, 8, 128, device=dev, dtype=dt).transpose(1, 2) for _ in range(2))

    def cudnn(f):
        def run():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return f()
        return run
    ops = {"vision qkv addmm+bias": lambda: F.linear(x, w3, b3),
           "vision fc1 gelu epilogue": lambda: torch._addmm_activation(b4, x, w4.t(), use_gelu=True),
           "vision fc1 as 4 × N=1024": lambda: [torch._addmm_activation(b4[i:i + 1024], x, w4[i:i + 1024].t(), use_gelu=True)
                                                 for i in range(0, 4096, 1024)],
           "vision qkv as 3 × N=1024": lambda: [F.linear(x, w3[i:i + 1024], b3[i:i + 1024]) for i in range(0, 3072, 1024)],
           "LM gate‖up": lambda: F.linear(xl, wgu),
           "LM gate, up": lambda: (F.linear(xl, wgu[:9728]), F.linear(xl, wgu[9728:])),
           "vision SDPA cudnn, strided": cudnn(lambda: F.scaled_dot_product_attention(q, k, v)),
           "vision SDPA cudnn, contiguous": cudnn(lambda: F.scaled_dot_product_attention(qc, kc, vc)),
           "LM SDPA cudnn causal GQA": cudnn(lambda: F.scaled_dot_product_attention(lq, lk, lv, is_causal=True,
                                                                                    enable_gqa=True))}
    out = {}
    for name, fn in ops.items():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        kinds = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        out[name] = {"memsets": sum("memset" in e.name.lower() for e in kinds),
                     "kernels": sum("memset" not in e.name.lower() for e in kinds), "ms": graph_ms(fn, 100)}
        print(f"{name:32s} {out[name]}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1050", help="comma-separated token counts of the language model's GEMMs")
    ap.add_argument("--vision", action="store_true", help="also the vision tower's GEMMs (4096 rows)")
    ap.add_argument("--autotune", action="store_true", help="also inductor max-autotune of the LM GEMMs")
    ap.add_argument("--memsets", action="store_true", help="only: the memset nodes each library call brings")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    tokens = [int(t) for t in a.tokens.split(",")]
    if a.memsets:
        result = memsets(dev, dt)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    result = {}
    shapes = [(f"LM {m}", (m, 2560, 32, 8, 128, 9728)) for m in tokens]
    if a.vision:
        shapes.append(("vision 4096", (4096, 1024, 16, 16, 64, 4096)))
    for blas in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(blas)
        for label, shape in shapes:
            for name, (fns, macs) in groups(*shape, dev, dt).items():
                ms = graph_ms(lambda: [f() for f in fns], a.reps)
                result[f"{blas}: {label}: {name}"] = {"ms": ms, "tflops": 2 * macs / ms / 1e9}
                print(f"{blas:9s} {label:11s} {name:26s} {ms * 1e3:8.1f} µs  {2 * macs / ms / 1e9:6.0f} TFLOP/s",
                      flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    more = {**attention(tokens[0], 4096, dev, dt)}
    if a.autotune:
        more.update({f"{k} ({tokens[0]} rows)": v for k, v in autotuned(tokens[0], 2560, 32, 8, 128, 9728, dev, dt).items()})
    try:
        more.update(qk_norm_rope_forms(tokens[0], dev, dt))
    except Exception as e:  # noqa: BLE001 - report and go on (no Triton, an older pack)
        print(f"qk_norm_rope forms: {type(e).__name__}: {e}")
    for name, (fn, flops) in more.items():
        try:
            ms = graph_ms(fn, a.reps)
        except RuntimeError as e:
            print(f"{name:36s} not available: {str(e).splitlines()[0][:100]}")
            continue
        flops = 2 * flops if name.startswith("autotuned") else flops      # (macs)
        result[name] = {"ms": ms, "tflops": flops / ms / 1e9 if flops else None}
        print(f"{name:36s} {ms * 1e3:8.1f} µs" + (f"  {flops / ms / 1e9:6.0f} TFLOP/s" if flops else ""), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
