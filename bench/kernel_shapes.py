"""The encode's kernels at their real shapes, variants side by side: GEMMs, attention back-ends, fused steps.

A 1024² Qwen3-VL-4B encode runs its language model on ≈ 1050 tokens, so its q/k/v (N = 4096 / 1024 / 1024)
and gate/up (N = 9728 ×2) GEMMs fill the GPU's SMs in awkward waves: separate, concatenated and on concurrent
streams. Attention: SDPA's back-ends for the vision tower (4096 tokens, head dim 64) and the language model
(causal, grouped-query, head dim 128). The q/k norm + RoPE step: the eager twin's op order compiled as is, and
its functional form (fusion.py). Each variant is timed as a replayed CUDA graph (no launch cost) in one
process. GPU only.

    python3 bench/kernel_shapes.py [--tokens 1050] [--reps 200] [--out FILE.json]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1050)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    result = {}
    for blas in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(blas)
        table = groups(a.tokens, 2560, 32, 8, 128, 9728, dev, dt)
        for name, (fns, macs) in table.items():
            ms = graph_ms(lambda: [f() for f in fns], a.reps)
            result[f"{blas}: {name}"] = {"ms": ms, "tflops": 2 * macs / ms / 1e9}
            print(f"{blas:9s} {name:26s} {ms * 1e3:8.1f} µs  {2 * macs / ms / 1e9:6.0f} TFLOP/s", flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    more = {**attention(a.tokens, 4096, dev, dt)}
    try:
        more.update(qk_norm_rope_forms(a.tokens, dev, dt))
    except Exception as e:  # noqa: BLE001 - report and go on (no Triton, an older pack)
        print(f"qk_norm_rope forms: {type(e).__name__}: {e}")
    for name, (fn, flops) in more.items():
        try:
            ms = graph_ms(fn, a.reps)
        except RuntimeError as e:
            print(f"{name:36s} not available: {str(e).splitlines()[0][:100]}")
            continue
        result[name] = {"ms": ms, "tflops": flops / ms / 1e9 if flops else None}
        print(f"{name:36s} {ms * 1e3:8.1f} µs" + (f"  {flops / ms / 1e9:6.0f} TFLOP/s" if flops else ""), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
