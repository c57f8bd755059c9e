"""DiT Layer Injection: VL conditioning inside chosen Z-Image main blocks and timesteps (ModelPatcher glue).

Everything is installed on ``model.clone()`` under one fixed key, so applying the node again replaces
its own hooks and never touches anyone else's (LoRA weight patches, other double_block patches,
wrappers and attention overrides all survive):

* an APPLY_MODEL wrapper (``WrappersMP.APPLY_MODEL``, key ``PATCH_KEY``) runs once per model call.
  It reads ``cond_or_uncond`` (no selected row: the model runs unchanged), fetches the VL tokens
  embedded with the model's own ``embed_cap`` (cap_embedder + caption RoPE positions + pad) and
  ``context_refiner`` — computed once per weights state, cached per device / dtype / length — and
  hands a per-call state to the hooks below through a copy of ``transformer_options``. The step's
  sigma (``transformer_options["sigmas"]``) is compared with [start, end] through the runtime
  ``model_sampling.percent_to_sigma`` (so a ModelSamplingAuraFlow placed after this node counts);
  it is copied to the host asynchronously and read by the first hook that needs it, never with a
  GPU stall in the wrapper, and not at all when the window is the whole run with constant strength.
  Outside the window every hook returns at once: the output is bit-identical to the plain model.
* caption_stream: a ``double_block`` patch moves the caption slice toward the embedded VL tokens
  after each selected main block, in place (no copy) when autograd/inference mode allow.
* extra_attention: a ``noise_refiner`` patch records the adaLN input ``vec``; an
  ``optimized_attention_override`` (installed per call, chaining any override already present)
  lets the image queries of each selected main block attend to the VL tokens projected with that
  block's own norm → adaLN scale → qkv → k-norm, a separate softmax added to the attention output
  before the block's output projection. The block's own attention is computed by the host as usual.
* concat: the APPLY_MODEL wrapper appends the area-pooled VL features to the raw caption features,
  which the model then embeds itself.

Nothing is patched at import time and nothing global is modified.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from comfy_api.latest import io

from ..vl_core import inject, pooling, schedule
from ..vl_core.checks import require_choice, require_width
from .common import CATEGORY, VLEmbedsType, check_vl_embeds

PATCH_KEY = "zimage_vl_dit_injection"
STATE_KEY = "zimage_vl_dit_injection_state"
METHODS = ("extra_attention", "caption_stream", "concat")
VL_ROPE = ("none", "caption")
WIDTH_HINT = ("use Qwen3-VL-4B (its 2560-d hidden states match Z-Image's Qwen3-4B text encoder); "
              "Qwen3-VL-8B (4096-d) and other encoders cannot condition Z-Image")
_BLOCK_KEYS = ("block_index", "block_type", "total_blocks")


# --------------------------------------------------------------------------- model checks

def zimage_diffusion_model(model):
    """The NextDiT of a Z-Image MODEL, or a ValueError that says what was connected."""
    import comfy.ldm.lumina.model as lumina

    if not hasattr(model, "get_model_object") or not hasattr(model, "clone"):
        raise ValueError(f"model must be a MODEL (ModelPatcher), got {type(model).__name__}")
    dit = model.get_model_object("diffusion_model")
    cap = getattr(dit, "cap_embedder", None)
    if not isinstance(dit, lumina.NextDiT) or not isinstance(cap, torch.nn.Sequential) or len(cap) < 2 \
            or not hasattr(dit, "context_refiner") or not hasattr(dit, "layers"):
        raise ValueError(f"DiT Layer Injection needs a Z-Image model (ComfyUI's NextDiT with a caption embedder), "
                         f"got {type(getattr(model, 'model', model)).__name__} / {type(dit).__name__}: load "
                         "z_image_turbo_bf16.safetensors with UNETLoader")
    return dit


def caption_width(dit) -> int:
    """Input width of the model's caption embedder (Z-Image: 2560), read from the model."""
    linear = dit.cap_embedder[1]
    width = getattr(linear, "in_features", None)
    if width is None:
        width = linear.weight.shape[1]
    return int(width)


def embed_like_caption(dit, feats: torch.Tensor, transformer_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """feats [1, n, D_cap] → (hidden [1, n', D], freqs_cis [1, n', 1, d/2, 2, 2]) exactly as the model embeds a
    caption: its own embed_cap (cap_embedder, pad to pad_tokens_multiple with cap_pad_token, RoPE positions
    1..n') then its context_refiner with mask None. n' = n padded."""
    embeds, freqs, _ = dit.embed_cap(feats, offset=0, bsz=1, device=feats.device, dtype=feats.dtype)
    hidden, freqs_cis = embeds[0], freqs[0].to(feats.device)
    for layer in dit.context_refiner:
        hidden = layer(hidden, None, freqs_cis, transformer_options=transformer_options)
    return hidden, freqs_cis


# --------------------------------------------------------------------------- runtime

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


class _CallState:
    """Per model call, handed to the hooks through transformer_options[STATE_KEY]."""

    __slots__ = ("owner", "_factor", "_read_sigma", "model_sampling", "rows", "dit", "caption", "hidden", "freqs",
                 "img_len", "vec", "prev_override", "opts", "uuid")

    def __init__(self, owner, rows, dit, opts, uuid, model_sampling, read_sigma, factor=None):
        self.owner, self.rows, self.dit, self.opts, self.uuid = owner, rows, dit, opts, uuid
        self.model_sampling, self._read_sigma, self._factor = model_sampling, read_sigma, factor
        self.caption = self.hidden = self.freqs = self.vec = self.prev_override = None
        self.img_len = 0

    def factor(self) -> float:
        """Window × schedule factor of this call's sigma, read on first use (1.0 without a read when the window
        is the whole run with a constant schedule)."""
        if self._factor is None:
            self._factor = self.owner.step_factor(self.model_sampling, self._read_sigma())
        return self._factor


class Injection:
    """The settings of one node application and the hooks that read them (shared by its clones)."""

    zimage_vl_key = PATCH_KEY

    def __init__(self, *, method: str, block_scale: list[float], caption_mode: str, window: schedule.TimestepWindow,
                 apply_to: str, token_budget: int, vl_rope: str, tokens: torch.Tensor):
        self.method = method
        self.block_scale = [float(w) for w in block_scale]  # strength × block weight
        self.caption_mode = caption_mode
        self.window = window
        self.apply_to = apply_to
        self.token_budget = int(token_budget)
        self.vl_rope = vl_rope
        self.tokens = tokens  # [1, N, D_cap] float32 on the CPU
        self._cache: dict = {}
        self._lock = threading.Lock()
        self._ms = None
        self._factors: dict[float, float] = {}
        # the whole run, constant strength: the factor is 1 at every step and no sigma needs reading
        self.always_on = window.start <= 0.0 and window.end >= 1.0 and (
            window.schedule == "constant" or method == "concat")

    # -- when -------------------------------------------------------------
    def step_factor(self, model_sampling, sigma: float) -> float:
        """Window × schedule factor at this sigma (0 outside the window); concat: 1 inside, 0 outside."""
        if model_sampling is not self._ms:
            self._ms, self._factors = model_sampling, {}
        f = self._factors.get(sigma)
        if f is None:
            p2s = model_sampling.percent_to_sigma
            if self.method == "concat":
                f = 1.0 if self.window.contains(sigma, p2s) else 0.0
            else:
                f = self.window.factor(sigma, p2s)
            self._factors[sigma] = f
        return f

    # -- embedded VL tokens (cached per weights state) --------------------
    def _cached(self, key: tuple, uuid, make):
        hit = self._cache.get(key)
        if hit is not None and hit[0] == uuid:
            return hit[1]
        with torch.no_grad():
            value = make()
        with self._lock:
            self._cache[key] = (uuid, value)
        return value

    def caption_tokens(self, dit, length: int, device, dtype, uuid, opts) -> torch.Tensor:
        """[1, length, D]: the VL features area-pooled to the caption slice length, embedded like the caption."""
        def make():
            feats = pooling.match_length(self.tokens, length, "pool").to(device=device, dtype=dtype)
            return embed_like_caption(dit, feats, opts)[0][:, :length]

        return self._cached(("caption", id(dit), str(device), dtype, length), uuid, make)

    def attention_tokens(self, dit, device, dtype, uuid, opts) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, n, D] embedded VL tokens, [1, n, 1, d/2, 2, 2] their caption RoPE), n = token budget (0 = all)."""
        def make():
            feats = self.tokens
            if 0 < self.token_budget < feats.shape[1]:
                feats = pooling.match_length(feats, self.token_budget, "pool")
            n = feats.shape[1]
            hidden, freqs = embed_like_caption(dit, feats.to(device=device, dtype=dtype), opts)
            return hidden[:, :n], freqs[:, :n]

        return self._cached(("attention", id(dit), str(device), dtype), uuid, make)

    def concat_tokens(self, device, dtype) -> torch.Tensor:
        """[1, n, D_cap] raw VL features area-pooled to the token budget (0 = all), for appending."""
        def make():
            feats = self.tokens
            if 0 < self.token_budget < feats.shape[1]:
                feats = pooling.match_length(feats, self.token_budget, "pool")
            return feats.to(device=device, dtype=dtype)

        return self._cached(("concat", str(device), dtype), None, make)

    # -- APPLY_MODEL wrapper -------------------------------------------------
    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        to = transformer_options if transformer_options is not None else {}

        def passthrough():
            return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)

        base = executor.class_obj
        rows = inject.chunk_rows(to.get("cond_or_uncond"), x.shape[0], self.apply_to)
        if not rows:
            return passthrough()
        if kwargs.get("ref_latents"):
            raise ValueError("DiT Layer Injection does not support Z-Image Omni reference latents (ref_latents): "
                             "remove the reference-latent conditioning or this node")
        if c_crossattn is None:
            raise ValueError("DiT Layer Injection: the model was called without caption features (c_crossattn)")
        sigmas = to.get("sigmas", t)
        if self.method == "concat":
            # the caption length must be decided before the call: read the sigma now (no read when always on)
            if not self.always_on and self.step_factor(base.model_sampling, sigma_reader(sigmas)()) == 0.0:
                return passthrough()
            return self._run_concat(executor, rows, x, t, c_concat, c_crossattn, control, to, kwargs)

        dit = base.diffusion_model
        dtype = base.get_dtype_inference()
        uuid = getattr(base, "current_weight_patches_uuid", None)
        opts = {k: v for k, v in to.items() if k not in _BLOCK_KEYS and k != STATE_KEY}
        state = _CallState(self, rows, dit, opts, uuid, base.model_sampling,
                           None if self.always_on else sigma_reader(sigmas), 1.0 if self.always_on else None)
        new_to = dict(opts)
        new_to[STATE_KEY] = state
        cap_len = inject.padded_length(c_crossattn.shape[1], dit.pad_tokens_multiple)
        if self.method == "caption_stream":
            state.caption = self.caption_tokens(dit, cap_len, x.device, dtype, uuid, opts)
        else:
            state.hidden, state.freqs = self.attention_tokens(dit, x.device, dtype, uuid, opts)
            p = dit.patch_size
            n_img = (-(-x.shape[-2] // p)) * (-(-x.shape[-1] // p))
            state.img_len = inject.padded_length(n_img, dit.pad_tokens_multiple)
            state.prev_override = to.get("optimized_attention_override")
            new_to["optimized_attention_override"] = self.attention_override
        return executor(x, t, c_concat, c_crossattn, control, new_to, **kwargs)

    # -- caption stream (double_block patch) --------------------------------
    def caption_patch(self, args: dict) -> dict:
        to = args.get("transformer_options") or {}
        st = to.get(STATE_KEY)
        if st is None or st.owner is not self:
            return {}
        i = args["block_index"]
        w = self.block_scale[i] if 0 <= i < len(self.block_scale) else 0.0
        if w == 0.0:
            return {}
        w *= st.factor()
        if w == 0.0:
            return {}
        txt = args["txt"]
        vl = st.caption
        if vl is None or vl.shape[1] != txt.shape[1] or vl.dtype != txt.dtype or vl.device != txt.device:
            # something between this wrapper and the model changed the caption: embed for what arrived
            vl = st.caption = self.caption_tokens(st.dit, txt.shape[1], txt.device, txt.dtype, st.uuid, st.opts)
        if inject.inplace_ok(txt):
            inject.caption_update_(txt, vl, w, self.caption_mode, st.rows)
            return {}
        return {"txt": inject.caption_update(txt, vl, w, self.caption_mode, st.rows)}

    # -- extra attention (noise_refiner patch + attention override) ---------
    def vec_patch(self, args: dict) -> dict:
        st = (args.get("transformer_options") or {}).get(STATE_KEY)
        if st is not None and st.owner is self:
            st.vec = args["vec"]
        return {}

    def attention_override(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        st = to.get(STATE_KEY)
        prev = st.prev_override if st is not None and st.owner is self else None
        out = prev(func, *args, **kwargs) if prev is not None else func(*args, **kwargs)
        if st is None or st.owner is not self or to.get("block_type") != "double":
            return out
        i = to.get("block_index")
        if not isinstance(i, int) or not 0 <= i < len(self.block_scale):
            return out
        w = self.block_scale[i]
        if w == 0.0:
            return out
        w *= st.factor()
        if w == 0.0:
            return out
        return self._add_extra_attention(func, out, w, i, st, args, kwargs, to)

    def _vl_keys_values(self, block, st: _CallState) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [b, H, n, d] of the VL tokens through this block: attention_norm1 → ×(1 + scale_msa) → qkv →
        k_norm → (caption RoPE or none) → GQA repeat."""
        if st.vec is None:
            raise RuntimeError("DiT Layer Injection: the noise_refiner patch did not record the adaLN input; "
                               "another node replaced Z-Image's noise refiner patches")
        attn = block.attention
        vec = inject.gather_rows(st.vec, st.rows)
        scale_msa = block.adaLN_modulation(vec).chunk(4, dim=1)[0]
        hidden = inject.modulate(block.attention_norm1(st.hidden), scale_msa)
        k, v = inject.split_kv(_project_kv(attn, hidden), attn.n_local_heads, attn.n_local_kv_heads, attn.head_dim)
        k = _k_norm(attn, k)
        if self.vl_rope == "caption":
            k = inject.apply_rope(k, st.freqs)
        n_rep = attn.n_local_heads // attn.n_local_kv_heads
        return inject.repeat_kv(k, n_rep).movedim(1, 2), inject.repeat_kv(v, n_rep).movedim(1, 2)

    def _add_extra_attention(self, func, out, w, i, st, args, kwargs, to):
        q = args[0] if args else kwargs.get("q")
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if not torch.is_tensor(q) or q.ndim != 4 or not kwargs.get("skip_reshape", False) or out.ndim != 3:
            raise RuntimeError("DiT Layer Injection: Z-Image's attention was called with an unexpected layout "
                               f"(q {getattr(q, 'shape', None)}, skip_reshape={kwargs.get('skip_reshape')}); this "
                               "ComfyUI version is not supported by extra_attention — use caption_stream or concat")
        block = st.dit.layers[i]
        k, v = self._vl_keys_values(block, st)
        start = q.shape[2] - st.img_len
        q_img = inject.gather_rows(q, st.rows)[:, :, start:]

        def host_attention(q_, k_, v_):
            return func(q_, k_, v_, heads, None, skip_reshape=True, transformer_options=to, _inside_attn_wrapper=True)

        extra = inject.decoupled_attention(q_img, k, v, attention=host_attention)
        if not inject.inplace_ok(out):
            out = out.clone()
        inject.add_scaled_(out, extra, w, start, st.rows)
        return out

    # -- concat ----------------------------------------------------------------
    def _run_concat(self, executor, rows, x, t, c_concat, c_crossattn, control, to, kwargs):
        batch = x.shape[0]
        vl = self.concat_tokens(c_crossattn.device, c_crossattn.dtype)
        n = vl.shape[1]

        def appended(ctx, kw):
            ctx = torch.cat([ctx, vl.expand(ctx.shape[0], -1, -1)], dim=1)
            kw = dict(kw)
            mask = kw.get("attention_mask")
            if torch.is_tensor(mask):
                kw["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=-1)
            if isinstance(kw.get("num_tokens"), int):
                kw["num_tokens"] = kw["num_tokens"] + n
            return ctx, kw

        if inject.rows_cover(rows, batch):
            ctx, kw = appended(c_crossattn, kwargs)
            return executor(x, t, c_concat, ctx, control, to, **kw)
        # a CFG batch with only some chunks selected: Z-Image does not mask its caption, so the selected
        # rows run with the VL tokens appended and the others unchanged, as two calls
        if control is not None:
            raise ValueError("DiT Layer Injection: concat with apply_to=cond_only cannot split a CFG batch that "
                             "carries a ControlNet; use apply_to=both or method=extra_attention / caption_stream")
        coru = list(to.get("cond_or_uncond") or [])
        size = batch // max(1, len(coru))
        segments, pos = [], 0
        for s, e in rows:
            if pos < s:
                segments.append((pos, s, False))
            segments.append((s, e, True))
            pos = e
        if pos < batch:
            segments.append((pos, batch, False))
        outputs = []
        for s, e, selected in segments:
            def cut(v, s=s, e=e):
                return v[s:e] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == batch else v

            sub_to = dict(to)
            for key in ("cond_or_uncond", "uuids"):
                if isinstance(to.get(key), list) and len(to[key]) == len(coru):
                    sub_to[key] = to[key][s // size:e // size]
            kw = {k: cut(v) for k, v in kwargs.items()}
            ctx = cut(c_crossattn)
            if selected:
                ctx, kw = appended(ctx, kw)
            outputs.append(executor(cut(x), cut(t), cut(c_concat), ctx, control, sub_to, **kw))
        return torch.cat(outputs, dim=0)


def _project_kv(attn, hidden: torch.Tensor) -> torch.Tensor:
    """[b, n, 2·Hkv·d]: only the k/v rows of the block's fused qkv projection (the VL queries are never needed),
    with the weight cast the way comfy.ops does it (lowvram offload, LoRA weight functions). Quantized weight
    types fall back to the full module call ([q | k | v], which split_kv also accepts)."""
    import comfy.ops

    lin = attn.qkv
    q_rows = attn.n_local_heads * attn.head_dim
    weight, bias, stream = comfy.ops.cast_bias_weight(lin, hidden, offloadable=True)
    try:
        if type(weight) in (torch.Tensor, torch.nn.Parameter) and (bias is None or type(bias) in
                                                                    (torch.Tensor, torch.nn.Parameter)):
            return torch.nn.functional.linear(hidden, weight[q_rows:], None if bias is None else bias[q_rows:])
    finally:
        comfy.ops.uncast_bias_weight(lin, weight, bias, stream)
    return lin(hidden)


def _k_norm(attn, k: torch.Tensor) -> torch.Tensor:
    """The block's own k-norm with the model's weight cast (lowvram/LoRA aware) and epsilon rule."""
    norm = attn.k_norm
    if not isinstance(norm, torch.nn.RMSNorm):  # qk_norm off: Identity
        return norm(k)
    import comfy.ops

    scale, _, stream = comfy.ops.cast_bias_weight(norm, k, offloadable=True)
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    out = inject.rms_norm_heads(k, scale, eps)
    comfy.ops.uncast_bias_weight(norm, scale, None, stream)
    return out


class _Hook:
    """A patch-list entry of ours (identified by zimage_vl_key so a re-application can remove it)."""

    zimage_vl_key = PATCH_KEY

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, args):
        return self.fn(args)


def remove_injection(model) -> None:
    """Drop this pack's wrapper and patches from a (cloned) ModelPatcher; other entries stay, in order."""
    import comfy.patcher_extension

    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY)
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    for name in list(patches):
        entries = patches[name]
        kept = [p for p in entries if getattr(p, "zimage_vl_key", None) != PATCH_KEY]
        if len(kept) != len(entries):
            if kept:
                patches[name] = kept
            else:
                del patches[name]


def install_injection(model, injection: Injection) -> None:
    """Replace this pack's hooks on a cloned ModelPatcher with the ones of `injection`."""
    import comfy.patcher_extension

    remove_injection(model)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, PATCH_KEY, injection)
    if injection.method == "caption_stream":
        model.set_model_double_block_patch(_Hook(injection.caption_patch))
    elif injection.method == "extra_attention":
        model.set_model_noise_refiner_patch(_Hook(injection.vec_patch))


def build_injection(model, vl, *, method: str, strength: float, block_weights: str, caption_mode: str = "lerp",
                    start_percent: float = 0.0, end_percent: float = 1.0, schedule_name: str = "constant",
                    apply_to: str = "cond_only", token_budget: int = 256, vl_rope: str = "none") -> Injection:
    """Validate everything against the model and return the Injection (raises ValueError with the fix)."""
    require_choice("method", method, METHODS)
    require_choice("caption_mode", caption_mode, inject.CAPTION_MODES)
    require_choice("apply_to", apply_to, inject.APPLY_TO)
    require_choice("vl_rope", vl_rope, VL_ROPE)
    vl = check_vl_embeds("vl_embeds", vl)
    dit = zimage_diffusion_model(model)
    require_width("VL embeddings", vl.width, "the Z-Image caption embedder (cap_embedder) input", caption_width(dit),
                  hint=WIDTH_HINT)
    num_blocks = len(dit.layers)
    weights = schedule.parse_block_weights(block_weights, num_blocks)
    window = schedule.TimestepWindow(start_percent, end_percent, schedule_name)
    if isinstance(token_budget, bool) or int(token_budget) != token_budget or token_budget < 0:
        raise ValueError(f"token_budget must be an integer >= 0 (0 = all VL tokens), got {token_budget!r}")
    strength = float(strength)
    if strength != strength or strength in (float("inf"), float("-inf")):
        raise ValueError(f"strength must be finite, got {strength}")
    block_scale = [strength * w for w in weights]
    if method != "concat" and not any(block_scale):
        raise ValueError(f"DiT Layer Injection would patch nothing: strength {strength} × block weights "
                         f"{block_weights!r} is 0 in all {num_blocks} blocks; raise strength or give some block "
                         f"a non-zero weight ({schedule.SPEC_HELP})")
    tokens = vl.tokens().detach().to(device="cpu", dtype=torch.float32)
    if tokens.shape[1] == 0:
        raise ValueError("vl_embeds has no tokens: check the token mode / spans of the encoding")
    tokens = tokens.reshape(1, -1, tokens.shape[-1])  # several images: their tokens side by side
    return Injection(method=method, block_scale=block_scale, caption_mode=caption_mode, window=window,
                     apply_to=apply_to, token_budget=int(token_budget), vl_rope=vl_rope, tokens=tokens)


def apply_injection(model, vl, **settings):
    """model.clone() with the injection installed (the node's execute, usable from scripts and the bench)."""
    injection = build_injection(model, vl, **settings)
    patched = model.clone()
    install_injection(patched, injection)
    return patched


# --------------------------------------------------------------------------- node

class DiTInjection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZImageVL_DiTInjection",
            display_name="DiT Layer Injection",
            category=CATEGORY,
            description="Training-free reference-image conditioning inside chosen Z-Image blocks and steps. "
                        "extra_attention: image tokens also attend to the VL tokens (IP-Adapter-like, keeps the "
                        "prompt); caption_stream: the caption stream is pulled toward the VL tokens in the chosen "
                        "blocks; concat: VL tokens appended to the caption (baseline).",
            inputs=[
                io.Model.Input("model", tooltip="Z-Image Turbo (UNETLoader → ModelSamplingAuraFlow)."),
                VLEmbedsType.Input("vl_embeds", tooltip="From VL Encode / Load VL Embeddings (Qwen3-VL-4B, 2560-d)."),
                io.Combo.Input("method", options=list(METHODS), default="extra_attention",
                               tooltip="extra_attention: in the chosen blocks image tokens additionally attend to "
                                       "the VL tokens (separate softmax, scaled by strength); caption_stream: after "
                                       "each chosen block the caption tokens move toward the VL tokens embedded like "
                                       "a caption; concat: token_budget VL tokens appended to the caption in every "
                                       "block (ignores strength and block_weights)."),
                io.Float.Input("strength", default=0.5, min=-2.0, max=4.0, step=0.05,
                               tooltip="Multiplies every block weight: extra_attention scale, caption_stream lerp "
                                       "weight (1 = caption replaced in that block). 0 = unchanged model."),
                io.String.Input("block_weights", default="all",
                                tooltip="Which main blocks and how much: 'all', 'early' (structure), 'middle', "
                                        "'late' (detail), or '0-9:1.0, 10-19:0.5, 27:0' (0-based, later entries win, "
                                        "unnamed blocks 0; Z-Image has 30 blocks)."),
                io.Combo.Input("caption_mode", options=list(inject.CAPTION_MODES), default="lerp",
                               tooltip="caption_stream only: lerp = txt + w·(vl − txt); add = txt + w·vl."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First sampling percent the injection acts at (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Last sampling percent the injection acts at (1 = last step)."),
                io.Combo.Input("schedule", options=list(schedule.SCHEDULES), default="constant",
                               tooltip="Strength over [start, end]: constant, linear_up (0→1), linear_down (1→0), "
                                       "cosine (smooth 1→0)."),
                io.Combo.Input("apply_to", options=list(inject.APPLY_TO), default="cond_only",
                               tooltip="cond_only: only the positive (conditional) half of a CFG batch; both: also "
                                       "the negative. With CFG 1 (Turbo) there is only the positive."),
                io.Int.Input("token_budget", default=256, min=0, max=8192, advanced=True,
                             tooltip="extra_attention / concat: VL tokens kept (area-pooled; 0 = all, ~1 per 32×32 "
                                     "px). Cost grows with it."),
                io.Combo.Input("vl_rope", options=list(VL_ROPE), default="none", advanced=True,
                               tooltip="extra_attention: RoPE of the VL keys. none = position-free set (rotation by "
                                       "position 0, one slot before the caption); caption = positions 1..n like a "
                                       "caption."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, vl_embeds, method: str, strength: float, block_weights: str, caption_mode: str,
                start_percent: float, end_percent: float, schedule: str, apply_to: str, token_budget: int,
                vl_rope: str) -> io.NodeOutput:
        patched = apply_injection(model, vl_embeds, method=method, strength=strength, block_weights=block_weights,
                                  caption_mode=caption_mode, start_percent=start_percent, end_percent=end_percent,
                                  schedule_name=schedule, apply_to=apply_to, token_budget=token_budget,
                                  vl_rope=vl_rope)
        return io.NodeOutput(patched)
