"""ModelPatcher glue of the DiT Layer Injection: the per-application object that ComfyUI calls, and its install.

One node application = one `Injection` under its own key (``PATCH_KEY`` or ``PATCH_KEY:<node id>``), so any
number of them live on one model, composing in the order applied (the first applied is the outermost
APPLY_MODEL wrapper, its patches run first, its attention override is called first by the next one's):

* an APPLY_MODEL wrapper (``WrappersMP.APPLY_MODEL``, the injection's key) runs once per model call. It reads
  ``cond_or_uncond`` (no selected row: the model runs unchanged) and hands the call to its method, which
  puts a per-call `CallState` under the injection's key in ``transformer_options[STATE_KEY]`` (a dict, one
  entry per injection; the others' entries pass through) and prepares what its hooks read.
* the method's patch-list hooks (`Hook`, tagged with the key so a re-application removes exactly its own)
  and, for methods that need it, an ``optimized_attention_override`` installed per call that chains any
  override already present.

The step's sigma (``transformer_options["sigmas"]``) is compared with [start, end] through the runtime
``model_sampling.percent_to_sigma`` (so a ModelSamplingAuraFlow placed after the node counts); it is copied
to the host asynchronously and read by the first hook that needs it, never with a GPU stall in the wrapper,
and not at all when the window is the whole run with constant strength. Outside the window every hook
returns at once: the output is bit-identical to the plain model. Nothing global is modified.
"""
from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..vl_core import inject
from ..vl_core.inject_settings import InjectionSettings

PATCH_KEY = "zimage_vl_dit_injection"
STATE_KEY = "zimage_vl_dit_injection_state"
BLOCK_KEYS = ("block_index", "block_type", "total_blocks")


def injection_key(node_id=None) -> str:
    """The wrapper/patch key of one node application: PATCH_KEY, or PATCH_KEY:<node id> inside a graph."""
    return PATCH_KEY if node_id in (None, "") else f"{PATCH_KEY}:{node_id}"


def sigma_reader(sigmas) -> Callable[[], float]:
    """A function returning the call's sigma as a float, without stalling the GPU pipeline.

    On CUDA the value is copied to pinned host memory asynchronously now and read (event wait) only when a
    hook first needs it, inside the main loop: by then the copy has long been queued behind the previous
    step and the GPU still has this step's embedding/refiner work queued, so the wait costs no GPU idle time
    (a plain float() here would stall the GPU ~2.4 ms per step on Z-Image at 1024², measured).
    """
    if not torch.is_tensor(sigmas):
        value = float(sigmas)
        return lambda: value
    flat = sigmas.detach().reshape(-1)[:1]
    if flat.device.type == "cuda":
        buf = torch.empty(1, dtype=flat.dtype, pin_memory=True)
        buf.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(flat.device))

        def read():
            event.synchronize()
            return float(buf[0])
        return read
    return lambda: float(flat[0])


class ModelCall:
    """The arguments of one APPLY_MODEL call, and a way to run it with some of them replaced."""

    def __init__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, kwargs):
        self.executor, self.x, self.t, self.c_concat, self.c_crossattn = executor, x, t, c_concat, c_crossattn
        self.control, self.to, self.kwargs = control, transformer_options, kwargs
        self.base = executor.class_obj

    def run(self, to=None, **replace):
        a = dict(x=self.x, t=self.t, c_concat=self.c_concat, c_crossattn=self.c_crossattn, control=self.control,
                 kwargs=self.kwargs)
        a.update(replace)
        return self.executor(a["x"], a["t"], a["c_concat"], a["c_crossattn"], a["control"],
                             self.to if to is None else to, **a["kwargs"])


class CallState:
    """One injection's state for one model call, at transformer_options[STATE_KEY][its key]."""

    __slots__ = ("owner", "_factor", "_read_sigma", "model_sampling", "rows", "dit", "caption", "vl", "img_len", "vec",
                 "prev_override", "opts", "uuid", "token_weights", "ref", "call")

    def __init__(self, owner, rows, dit, opts, uuid, model_sampling, read_sigma, factor=None):
        self.owner, self.rows, self.dit, self.opts, self.uuid = owner, rows, dit, opts, uuid
        self.model_sampling, self._read_sigma, self._factor = model_sampling, read_sigma, factor
        self.caption = self.vl = self.vec = self.prev_override = self.token_weights = self.ref = self.call = None
        self.img_len = 0

    def factor(self) -> float:
        """Window × schedule factor of this call's sigma, read on first use (1.0 without a read when the window
        is the whole run with a constant schedule)."""
        if self._factor is None:
            self._factor = self.owner.step_factor(self.model_sampling, self._read_sigma())
        return self._factor

    def within(self, start: int, end: int) -> CallState | None:
        """This state for a sub-call on rows [start, end) of the batch (rows rebased), None if none selected."""
        rows = inject.rows_within(self.rows, start, end)
        if not rows:
            return None
        part = copy.copy(self)
        part.rows = rows
        return part


def states_within(to: dict, start: int, end: int) -> dict:
    """transformer_options for a sub-call on rows [start, end): every injection's state rebased to those rows."""
    states = to.get(STATE_KEY)
    if not states:
        return to
    out = dict(to)
    out[STATE_KEY] = {k: p for k, p in ((k, s.within(start, end)) for k, s in states.items()) if p is not None}
    return out


@dataclass(frozen=True)
class InjectionInputs:
    """What one node application injects, validated and on the CPU in float32 (None: not connected).

    tokens [1, N, D_cap] VL tokens, spans [((start, end), weight)] of its references (one of weight 1 for a plain
    encode), negative [1, M, D_cap] a negative VL reference, reference [1, C, h, w] a VAE latent (before the
    model's process_latent_in), mask [Bm, H, W] in [0, 1], direction [K, D_cap] a steering direction.
    """

    tokens: torch.Tensor | None = None
    spans: list = field(default_factory=list)
    negative: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    reference_seed: int = 0
    mask: torch.Tensor | None = None
    direction: torch.Tensor | None = None


class Method:
    """Base of the injection methods (nodes/injection_methods.py): no hooks; runs the model call with this
    injection's state in transformer_options, and installs the attention override when the method defines
    `attention` (inj, st, func, out, w, i, args, kwargs, to) -> out."""

    traits = None
    patches: tuple[str, ...] = ()
    attention = None

    def run(self, inj: Injection, call: ModelCall, rows) -> object:
        state, to = inj.new_state(call, rows)
        if self.attention is not None:
            state.prev_override = call.to.get("optimized_attention_override")
            to["optimized_attention_override"] = inj.attention_override
        self.prepare(inj, state, call)
        return call.run(to)

    def prepare(self, inj: Injection, st: CallState, call: ModelCall) -> None:
        """Per model call, before the model runs: fill the state the hooks read."""


class Injection:
    """One node application: its method, validated settings and inputs, and the hooks that read them."""

    def __init__(self, method, settings: InjectionSettings, inputs: InjectionInputs, key: str = PATCH_KEY):
        if method.traits != settings.method:
            raise ValueError(f"settings are for {settings.method.name}, not {method.traits.name}")
        self.method, self.settings, self.key, self.inputs = method, settings, key, inputs
        self.block_scale = list(settings.block_scale)  # strength × block weight per main block
        self.tokens, self.spans, self.negative = inputs.tokens, inputs.spans, inputs.negative
        self.reference, self.reference_seed, self.mask = inputs.reference, inputs.reference_seed, inputs.mask
        self.direction = inputs.direction
        self._cache: dict = {}
        self._run_cache: dict[int, tuple] = {}  # id(run tensor) → (weakref to it, {key: value})
        self._notes: set = set()
        self._lock = threading.Lock()
        self._ms = None
        self._factors: dict[float, float] = {}
        self.always_on = settings.always_on

    # -- when -----------------------------------------------------------------
    def step_factor(self, model_sampling, sigma: float) -> float:
        """settings.step_factor at this sigma, remembered per sigma for the model_sampling in use."""
        if model_sampling is not self._ms:
            self._ms, self._factors = model_sampling, {}
        f = self._factors.get(sigma)
        if f is None:
            f = self._factors[sigma] = self.settings.step_factor(sigma, model_sampling.percent_to_sigma)
        return f

    def block_weight(self, st: CallState, i) -> float:
        """strength × block weight × the step's factor at main block i (0: do nothing)."""
        w = self.block_scale[i] if isinstance(i, int) and 0 <= i < len(self.block_scale) else 0.0
        return w * st.factor() if w != 0.0 else 0.0

    # -- per-call preparation helpers ----------------------------------------------
    def cached(self, key: tuple, uuid, make):
        """make() under no_grad, remembered per key for the weights state `uuid` (LoRA patches change it)."""
        hit = self._cache.get(key)
        if hit is not None and hit[0] == uuid:
            return hit[1]
        with torch.no_grad():
            value = make()
        with self._lock:
            self._cache[key] = (uuid, value)
        return value

    def cached_for_run(self, run: torch.Tensor, key: tuple, make):
        """make() under no_grad, remembered per key for as long as the tensor `run` lives (a sampling run's
        sample_sigmas), so nothing outlives the run."""
        with self._lock:
            held = self._run_cache.get(id(run))
            if held is None or held[0]() is not run:
                held = self._run_cache[id(run)] = (weakref.ref(run), {})
                weakref.finalize(run, self._run_cache.pop, id(run), None)  # tensors hash by identity, not value
            entries = held[1]
        hit = entries.get(key)
        if hit is None:
            with torch.no_grad():
                hit = entries[key] = make()
        return hit

    def note_once(self, key) -> bool:
        """True the first time `key` is seen (a warning logged once per application, not once per step)."""
        with self._lock:
            new = key not in self._notes
            self._notes.add(key)
        return new

    def new_state(self, call: ModelCall, rows, factor: float | None = None) -> tuple[CallState, dict]:
        """A CallState for this call and the transformer_options that carry it (the others' states kept);
        `factor`: the step's window × schedule factor when the caller already read it."""
        to, base = call.to, call.base
        sigmas = to.get("sigmas", call.t)
        if self.always_on:
            factor = 1.0
        opts = {k: v for k, v in to.items() if k not in BLOCK_KEYS and k != STATE_KEY}
        state = CallState(self, rows, base.diffusion_model, opts, getattr(base, "current_weight_patches_uuid", None),
                          base.model_sampling, None if factor is not None else sigma_reader(sigmas), factor)
        new_to = dict(opts)
        new_to[STATE_KEY] = {**(to.get(STATE_KEY) or {}), self.key: state}
        return state, new_to

    def state_in(self, transformer_options) -> CallState | None:
        st = ((transformer_options or {}).get(STATE_KEY) or {}).get(self.key)
        return st if st is not None and st.owner is self else None

    # -- the APPLY_MODEL wrapper -----------------------------------------------------
    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        call = ModelCall(executor, x, t, c_concat, c_crossattn, control,
                         transformer_options if transformer_options is not None else {}, kwargs)
        rows = inject.chunk_rows(call.to.get("cond_or_uncond"), x.shape[0], self.settings.apply_to)
        if not rows:
            return call.run()
        if kwargs.get("ref_latents"):
            raise ValueError("DiT Layer Injection does not support Z-Image Omni reference latents (ref_latents): "
                             "remove the reference-latent conditioning or this node")
        if c_crossattn is None:
            raise ValueError("DiT Layer Injection: the model was called without caption features (c_crossattn)")
        return self.method.run(self, call, rows)

    # -- the attention override (installed per call by methods that need it) ---------
    def attention_override(self, func, *args, **kwargs):
        """Down the chain: a method's inner_attention (concat's bias) replaces func for the overrides below;
        after it: the method's attention(…) adds to the output. Outside a selected main block: unchanged."""
        to = kwargs.get("transformer_options") or {}
        st = self.state_in(to)
        prev = st.prev_override if st is not None else None
        acting = st is not None and to.get("block_type") == "double"
        i = to.get("block_index")
        w = self.block_weight(st, i) if acting else 0.0
        inner = getattr(self.method, "inner_attention", None)
        if acting and inner is not None:  # a log-strength 0 still acts: log 0 = −inf
            func = inner(self, st, func, w)
        out = prev(func, *args, **kwargs) if prev is not None else func(*args, **kwargs)
        if not acting or w == 0.0 or self.method.attention is None:
            return out
        return self.method.attention(self, st, func, out, w, i, args, kwargs, to)


def host_override(to: dict):
    """The attention override under every injection's own in this call (another pack's, or None)."""
    override = to.get("optimized_attention_override")
    states = to.get(STATE_KEY) or {}
    while override is not None and isinstance(getattr(override, "__self__", None), Injection):
        st = states.get(override.__self__.key)
        override = st.prev_override if st is not None else None
    return override


def plain_options(to: dict) -> dict:
    """transformer_options for a pass of the model's own layers that no injection acts on (a reference's):
    no per-call states or block keys, the host's attention override only."""
    opts = {k: v for k, v in to.items() if k not in BLOCK_KEYS and k not in (STATE_KEY, "optimized_attention_override")}
    override = host_override(to)
    if override is not None:
        opts["optimized_attention_override"] = override
    return opts


class Hook:
    """A patch-list entry of one injection: calls its method's hook of the same name with that call's state."""

    def __init__(self, injection: Injection, name: str):
        self.injection, self.name = injection, name
        self.zimage_vl_key = injection.key
        self._fn = getattr(injection.method, name)

    def __call__(self, args):
        st = self.injection.state_in(args.get("transformer_options"))
        return {} if st is None else self._fn(self.injection, st, args)


def remove_injection(model, key: str = PATCH_KEY) -> None:
    """Drop one injection's wrapper and patches from a (cloned) ModelPatcher; other entries stay, in order."""
    import comfy.patcher_extension

    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key)
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    for name in list(patches):
        entries = patches[name]
        kept = [p for p in entries if getattr(p, "zimage_vl_key", None) != key]
        if len(kept) != len(entries):
            if kept:
                patches[name] = kept
            else:
                del patches[name]


def install_injection(model, injection: Injection) -> None:
    """Put `injection` on a cloned ModelPatcher, replacing an earlier one under the same key only."""
    import comfy.patcher_extension

    remove_injection(model, injection.key)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, injection.key, injection)
    for name in injection.method.patches:
        model.set_model_patch(Hook(injection, name), name)
