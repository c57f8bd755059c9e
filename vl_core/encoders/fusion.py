"""Which elementwise steps the Qwen3-VL runner uses: the eager twins or their torch.compile versions.

The steps themselves (small pure functions of tensors, rows first) live in fused_steps.py. The runner calls
`ops.<step>` with `ops = Fusion.ops(key)`: the eager twins (exactly the runner's former op sequence) until the
compiled set for that key (device, dtype, model widths) is ready. Compilation (inductor) never happens at import
or inside a first encode: after the first encode on a CUDA device it runs in a background thread on dummies of
that encode's shapes, with the row dimension marked dynamic (fused_steps.DYNAMIC_DIMS; one graph per step for
every image size and batch), using inductor's on-disk caches (FX graph, AOT autograd, Triton kernels) under
COMPILE_CACHE, so a later process loads the kernels instead of compiling them. Off: env ZIMAGE_VL_COMPILE=0, the CPU (unless mode "on"/"sync"),
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

from ..checks import require_choice
from .fused_steps import COMPILED_FORMS, DYNAMIC_DIMS, EAGER_ONLY, FUSED_ONLY, STEPS

log = logging.getLogger("comfyui-zimage-vl")

MODES = ("auto", "on", "sync", "off")     # auto: CUDA + Triton, background; on: any device, background; sync: inline
ENV_MODE = "ZIMAGE_VL_COMPILE"            # 0/off/false/no -> off; 1/on/true/yes -> on; auto; sync
ENV_CACHE = "ZIMAGE_VL_COMPILE_CACHE"     # inductor cache dir (default ~/.cache/comfyui-zimage-vl/inductor)



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
        """Compile and run every step once on `examples` (name -> args, or a list of them; rows marked dynamic);
        record the key or the failure."""
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
                for name, variants in examples.items():
                    for args in variants if isinstance(variants, list) else [variants]:
                        for i, a in enumerate(args):
                            if isinstance(a, torch.Tensor) and a.ndim >= 2:
                                for dim in DYNAMIC_DIMS.get(name, {}).get(i, (0,)):
                                    torch._dynamo.maybe_mark_dynamic(a, dim)
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
