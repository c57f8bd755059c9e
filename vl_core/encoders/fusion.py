"""Fused elementwise steps of the Qwen3-VL runner: eager twins (today's op order) and their torch.compile versions.

Each step is a small pure function of tensors (rows first: [R, ...], R = batch · tokens). The runner calls
`ops.<step>` with `ops = Fusion.ops(key)`: the eager twins (exactly the runner's former op sequence) until the
compiled set for that key (device, dtype, model widths) is ready. Compilation (inductor) never happens at import
or inside a first encode: after the first encode on a CUDA device it runs in a background thread on dummies of
that encode's shapes, with the row dimension marked dynamic (one graph per step for every image size and batch),
using inductor's on-disk caches (FX graph, AOT autograd, Triton kernels) under COMPILE_CACHE, so a later process
loads the kernels instead of compiling them. Off: env ZIMAGE_VL_COMPILE=0, the CPU (unless mode "on"/"sync"),
no Triton, or a failed compile (logged once; eager from then on). Mode "sync" compiles inside the first encode.
Mode "auto" uses the compiled steps only in forwards captured as CUDA graphs: uncaptured, their host cost per
call (guards + wrapper, ≈ 50 µs × ~200 calls an encode, measured on an H200) outweighs the GPU time they save;
modes "on" / "sync" use them in every forward (tests, CPU).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F

from ..checks import require_choice

log = logging.getLogger("comfyui-zimage-vl")

MODES = ("auto", "on", "sync", "off")     # auto: CUDA + Triton, background; on: any device, background; sync: inline
ENV_MODE = "ZIMAGE_VL_COMPILE"            # 0/off/false/no -> off; 1/on/true/yes -> on; auto; sync
ENV_CACHE = "ZIMAGE_VL_COMPILE_CACHE"     # inductor cache dir (default ~/.cache/comfyui-zimage-vl/inductor)


# ------------------------------------------------------------------ the steps (eager twins)

def rope(x, cos, ssin):
    """Rotate-half RoPE on the last dim, x·cos + rotate_half(x)·sin in x's dtype (ComfyUI's op order: one
    product, two in-place multiply-adds); ssin = signed sin [-sin(first half), sin(second half)]."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], ssin[..., :half])
    out[..., half:].addcmul_(x[..., :half], ssin[..., half:])
    return out


def add_rms_norm(x, r, w, eps: float):
    """h = x + r; (h, h / sqrt(mean(h²) + eps) · w): residual add and the next RMSNorm."""
    h = x + r
    return h, F.rms_norm(h, (h.shape[-1],), w, eps)


def add_layer_norm(x, r, w, b, eps: float):
    """h = x + r; (h, LayerNorm(h)·w + b): residual add and the next LayerNorm."""
    h = x + r
    return h, F.layer_norm(h, (h.shape[-1],), w, b, eps)


def qk_norm_rope(q, k, qw, kw, q_eps: float, k_eps: float, cos, ssin):
    """Per-head RMSNorm then RoPE of q [R, H, hd] and k [R, Hkv, hd]; cos, ssin [R, 1, hd]."""
    q = rope(F.rms_norm(q, (q.shape[-1],), qw, q_eps), cos, ssin)
    k = rope(F.rms_norm(k, (k.shape[-1],), kw, k_eps), cos, ssin)
    return q, k


def qkv_norm_rope(qkv, qw, kw, q_eps: float, k_eps: float, cos, ssin, heads: int, kv_heads: int):
    """qk_norm_rope of q = qkv[:, :heads], k = qkv[:, heads:heads + kv_heads] of one joint projection
    qkv [R, heads + 2·kv_heads, hd] (v, the rest, is read by the caller as a view)."""
    return qk_norm_rope(qkv[:, :heads], qkv[:, heads:heads + kv_heads], qw, kw, q_eps, k_eps, cos, ssin)


def qkv_rope(qkv, cos, ssin):
    """Vision q, k of qkv [R, 3, H, hd] rotated (each [R, H, hd]); cos, ssin [R, 1, 1, hd]."""
    return rope(qkv[:, :2], cos, ssin).unbind(1)


def silu_mul(g, u):
    """SiLU(g) · u (the gated MLP's product)."""
    return F.silu(g) * u


def silu_mul_joint(gu):
    """silu_mul of gu = [g | u] [R, 2F], one joint gate/up projection (its halves read as views)."""
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def linear_gelu_tanh(x, w, b):
    """GELU_tanh(x Wᵀ + b) (the vision MLP's first layer)."""
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def linear_gelu_tanh_epilogue(x, w, b):
    """linear_gelu_tanh with the GELU in the GEMM's epilogue on CUDA (cuBLASLt GELU_BIAS, through
    torch._addmm_activation: one kernel instead of GEMM + a GELU pass over [R, 4·D]); eager elsewhere."""
    if b is None or not x.is_cuda or not hasattr(torch, "_addmm_activation"):
        return linear_gelu_tanh(x, w, b)
    y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True)
    return y.view(*x.shape[:-1], w.shape[0])


def rope_functional(x, cos, ssin):
    """rope() without in-place slice updates: x·cos + [x₂, x₁]·ssin (the sign lives in ssin). What inductor
    compiles: the slice-wise addcmul_ of the eager op order became several kernels per step (≈ 23 µs per
    language-model layer for the q/k norm + RoPE on an H200, bench/kernel_shapes.py), this one pointwise pass."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * ssin


def qk_norm_rope_functional(q, k, qw, kw, q_eps: float, k_eps: float, cos, ssin):
    """qk_norm_rope through rope_functional."""
    q = rope_functional(F.rms_norm(q, (q.shape[-1],), qw, q_eps), cos, ssin)
    k = rope_functional(F.rms_norm(k, (k.shape[-1],), kw, k_eps), cos, ssin)
    return q, k


def qkv_norm_rope_functional(qkv, qw, kw, q_eps: float, k_eps: float, cos, ssin, heads: int, kv_heads: int):
    """qkv_norm_rope through rope_functional."""
    return qk_norm_rope_functional(qkv[:, :heads], qkv[:, heads:heads + kv_heads], qw, kw, q_eps, k_eps, cos, ssin)


def qkv_rope_functional(qkv, cos, ssin):
    """qkv_rope through rope_functional."""
    return rope_functional(qkv[:, :2], cos, ssin).unbind(1)


def step_examples(runner, rows: int, vision_rows: int) -> dict:
    """Dummy arguments of every fused step at a Qwen3VLRunner encode's row counts (its real norm weights, compute
    dtype, device): what the background compile traces."""
    s, layer, blk = runner.spec, runner.lm.layers[0], runner.visual.blocks[0]

    def z(*shape):
        return torch.zeros(shape, dtype=runner.dtype, device=runner.device)

    def norm(m):
        w, b, eps, tok = runner._norm_params(m)
        if tok is not None:        # a per-call cast: keep a copy, give the cast back
            w, b = w.clone(), (b.clone() if b is not None else None)
            runner._release(m, w, b, tok)
        return w, b, eps

    w, _, eps = norm(layer.input_layernorm)
    qw, _, qe = norm(layer.self_attn.q_norm)
    kw, _, ke = norm(layer.self_attn.k_norm)
    vw, vb, veps = norm(blk.norm1)
    f = layer.mlp.gate_proj.weight.shape[0]
    hd, vhd = s.head_dim, s.vision_head_dim
    return {"add_rms_norm": (z(rows, s.hidden), z(rows, s.hidden), w, eps),
            "qk_norm_rope": (z(rows, s.heads, hd), z(rows, s.kv_heads, hd), qw, kw, qe, ke,
                             z(rows, 1, hd), z(rows, 1, hd)),
            "qkv_norm_rope": (z(rows, s.heads + 2 * s.kv_heads, hd), qw, kw, qe, ke, z(rows, 1, hd), z(rows, 1, hd),
                              s.heads, s.kv_heads),
            "silu_mul": (z(rows, f), z(rows, f)),
            "silu_mul_joint": (z(rows, 2 * f),),
            "add_layer_norm": (z(vision_rows, s.vision_hidden), z(vision_rows, s.vision_hidden), vw, vb, veps),
            "qkv_rope": (z(vision_rows, 3, s.vision_heads, vhd), z(vision_rows, 1, 1, vhd),
                         z(vision_rows, 1, 1, vhd))}


STEPS = {f.__name__: f for f in (add_rms_norm, add_layer_norm, qk_norm_rope, qkv_norm_rope, qkv_rope, silu_mul,
                                         silu_mul_joint)}
COMPILED_FORMS = {"qk_norm_rope": qk_norm_rope_functional,     # what torch.compile takes for a step, where its
                  "qkv_norm_rope": qkv_norm_rope_functional,   # eager op order does not compile to one pass
                  "qkv_rope": qkv_rope_functional}
EAGER_ONLY = {"linear_gelu_tanh": linear_gelu_tanh}                # steps torch.compile does not take over:
FUSED_ONLY = {"linear_gelu_tanh": linear_gelu_tanh_epilogue}       # their fused form is a library kernel


class _Steps:
    """A namespace of the steps (attribute access for the runner's loop)."""

    def __init__(self, table: dict[str, Callable], fused: bool):
        self.__dict__.update(table)
        self.fused = fused


EAGER = _Steps({**STEPS, **EAGER_ONLY}, fused=False)


# ------------------------------------------------------------------ compiled steps (one process-wide set)

def compile_cache_dir() -> str:
    """Where inductor keeps its caches: $ZIMAGE_VL_COMPILE_CACHE, else $XDG_CACHE_HOME (~/.cache)/comfyui-zimage-vl/inductor."""
    path = os.environ.get(ENV_CACHE)
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "comfyui-zimage-vl", "inductor")
    return path


def _compiled_marker(cache_dir: str) -> str:
    """A file the pack writes into the inductor cache after its steps compiled there under this torch version."""
    return os.path.join(cache_dir, f"zimage-vl-compiled-torch-{torch.__version__}")


def compile_threads(cache_dir: str, default: int) -> int:
    """Inductor's compile workers for the pack's warm-up: 1 (compile in-process) once its steps were compiled into
    this cache by this torch version, else `default` (a worker pool). Measured on an H200 machine
    (bench/README.md): after a warm-cache compile (≈ 4 s) the pool's worker processes, each importing torch, were
    still booting and slowed torch's multi-threaded staging copy of the next encodes from 0.13 to 8 ms;
    compiling Triton kernels in-process from an empty cache held the interpreter long enough to slow the first
    encode ×4."""
    return 1 if os.path.exists(_compiled_marker(cache_dir)) else default


@contextlib.contextmanager
def _warm_up_compile_threads(cache_dir: str):
    """compile_threads() for the duration of the pack's warm-up, then the process's setting again (the setting is
    process-wide: another compile in the process during those seconds sees it too); the env var
    TORCHINDUCTOR_COMPILE_THREADS wins."""
    import torch._inductor.config as inductor_config

    if os.environ.get("TORCHINDUCTOR_COMPILE_THREADS") is not None:
        yield
        return
    with inductor_config.patch(compile_threads=compile_threads(cache_dir, inductor_config.compile_threads)):
        yield


def _use_cache_dir() -> str:
    """Point inductor's on-disk caches at compile_cache_dir() unless the user chose one (TORCHINDUCTOR_CACHE_DIR);
    the folder in use."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        path = compile_cache_dir()
        os.makedirs(path, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    import torch._inductor.config as inductor_config

    if os.environ.get("TORCHINDUCTOR_FX_GRAPH_CACHE") is None:      # the user's explicit choice wins
        inductor_config.fx_graph_cache = True
    try:
        import torch._functorch.config as functorch_config

        if os.environ.get("TORCHINDUCTOR_AUTOGRAD_CACHE") is None:
            functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):
        pass
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


class _Compiler:
    """The compiled twins (created on first use) and which keys were warmed (compiled + run once) so far."""

    SWITCH_INTERVAL = 0.0005     # s: the interpreter's GIL switch interval during a background compile

    def __init__(self):
        self.lock = threading.Lock()
        self.steps: _Steps | None = None
        self.warmed: set = set()
        self.pending: Hashable | None = None     # key being compiled in the background thread
        self.thread: threading.Thread | None = None
        self.failed: str | None = None
        self.seconds: dict = {}                 # key -> compile (warm-up) wall time

    def compiled(self) -> _Steps:
        if self.steps is None:
            self.steps = _Steps({**{name: torch.compile(COMPILED_FORMS.get(name, fn), fullgraph=True)
                                    for name, fn in STEPS.items()},
                                 **FUSED_ONLY}, fused=True)
        return self.steps

    def warm(self, key: Hashable, examples: dict, device: torch.device) -> None:
        """Compile and run every step once on `examples` (name -> args; rows marked dynamic); record the key or
        the failure."""
        import time

        t0 = time.perf_counter()
        interval = sys.getswitchinterval()
        if threading.current_thread() is not threading.main_thread():   # hand the GIL back to the caller's thread
            sys.setswitchinterval(min(interval, self.SWITCH_INTERVAL))   # quickly while compiling (default 5 ms)
        try:
            cache_dir = _use_cache_dir()
            steps = self.compiled()
            guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
            with guard, torch.inference_mode(), _warm_up_compile_threads(cache_dir):
                for name, args in examples.items():
                    for a in args:
                        if isinstance(a, torch.Tensor) and a.ndim >= 2:
                            torch._dynamo.maybe_mark_dynamic(a, 0)
                    getattr(steps, name)(*args)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            with self.lock:
                self.warmed.add(key)
                self.seconds[key] = time.perf_counter() - t0
            with contextlib.suppress(OSError):        # a read-only cache: the next process uses the pool again
                open(_compiled_marker(cache_dir), "a").close()
            log.info("Qwen3-VL runner: fused kernels ready in %.1f s (cache %s)", self.seconds[key], cache_dir)
        except Exception as e:  # noqa: BLE001 - fusion is an optimisation: fall back to eager for good
            self.failed = f"{type(e).__name__}: {e}"
            log.warning("Qwen3-VL runner: torch.compile of the fused steps failed (%s); running eagerly", self.failed)
        finally:
            sys.setswitchinterval(interval)
            with self.lock:
                self.pending = None


_COMPILER = _Compiler()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def mode_from_env(value: str | None = None) -> str:
    """The mode ZIMAGE_VL_COMPILE asks for (unset: "off" — opt in with auto: the compile cache is written outside
    the pack's folder and the background compile slows the rest of the process for seconds; bench/README.md
    "VL encode")."""
    value = (os.environ.get(ENV_MODE, "off") if value is None else value).strip().lower()
    return {"0": "off", "false": "off", "no": "off", "": "off", "1": "on", "true": "on", "yes": "on"}.get(value, value)


class Fusion:
    """A runner's fusion setting (mode) over the process-wide compiled steps.

    ops(key, device) -> the steps to use now; after_encode(key, device, examples) starts the compile where wanted.
    """

    def __init__(self, mode: str | None = None):
        mode = mode_from_env(mode)
        require_choice(f"fusion mode ({ENV_MODE})", mode, MODES)
        self.mode = mode
        self.uncaptured = mode in ("on", "sync")     # compiled steps also in forwards not captured as a CUDA graph

    def wanted(self, device: torch.device) -> bool:
        """Compilation applies here: not off, no earlier failure, CUDA with Triton (any device in mode on/sync)."""
        if self.mode == "off" or _COMPILER.failed is not None:
            return False
        if self.mode == "auto":
            return device.type == "cuda" and _triton_available()
        return device.type == "cuda" or device.type == "cpu"

    @staticmethod
    def busy() -> bool:
        """A background compile is running (the runner captures no CUDA graph meanwhile)."""
        return _COMPILER.pending is not None

    def ops(self, key: Hashable, device: torch.device) -> _Steps:
        """The compiled steps if `key` is warmed and fusion is wanted, else the eager twins."""
        if key in _COMPILER.warmed and self.wanted(device):
            return _COMPILER.compiled()
        return EAGER

    def after_encode(self, key: Hashable, device: torch.device, examples: Callable[[], dict]) -> None:
        """After an eager encode: compile for `key` (background thread; inline in mode "sync") unless done or running.
        examples() (step name -> args: this encode's shapes) is called here, in the caller's thread."""
        if not self.wanted(device) or key in _COMPILER.warmed:
            return
        with _COMPILER.lock:
            if _COMPILER.pending is not None:
                return
            _COMPILER.pending = key
        try:
            with torch.inference_mode():
                examples = examples()
        except Exception:
            _COMPILER.pending = None
            raise
        if self.mode == "sync":
            _COMPILER.warm(key, examples, device)
            return
        _COMPILER.thread = threading.Thread(target=_COMPILER.warm, args=(key, examples, device),
                                            name="zimage-vl-compile", daemon=True)
        _COMPILER.thread.start()

    @staticmethod
    def wait(timeout: float | None = None) -> bool:
        """Block until a background compile finishes (benchmarks / tests); True if none is running afterwards."""
        thread = _COMPILER.thread
        if thread is not None:
            thread.join(timeout)
        return _COMPILER.pending is None

    @staticmethod
    def status() -> dict:
        """What the compiler did: warmed keys' compile seconds, failure reason, whether one is running."""
        return {"warmed": len(_COMPILER.warmed), "seconds": list(_COMPILER.seconds.values()),
                "failed": _COMPILER.failed, "running": _COMPILER.pending is not None}
