"""The DiT Layer Injection methods, one small class each, and the registry the node's `method` Combo lists.

A method says which ComfyUI patch lists it hooks (`patches`: a hook method of the same name is called with
the injection, its per-call state and the patch args), whether it needs the per-call attention override
(`attention`), what it prepares per model call (`prepare`) and what it does per selected block. The math is
in vl_core.inject / inject_extra; `traits` tell the settings how strength, block weights and schedule apply.

    caption_stream   after each selected main block the caption slice moves toward the VL tokens embedded
                     like a caption (in place when autograd / inference mode allow)
    extra_attention, reference_attention   injection_attention.py
    concat           the area-pooled VL features are appended to the raw caption features, which the model
                     then embeds itself (while the window is open); strength × block weight w is a log-strength
                     bias log(w) on their keys in the main blocks (core StyleModelApply's attn_bias; w = 1: none)
    steer_caption, steer_image   a VL_DIRECTION, mapped into the model's width by the caption embedder's linear
                     map, added after each selected block to the caption or the image tokens, w · per-token RMS
"""
from __future__ import annotations

import math

import torch

from ..vl_core import inject, inject_extra, pooling
from ..vl_core.checks import require_choice
from ..vl_core.inject_settings import MethodTraits
from .injection_attention import ExtraAttention, ReferenceAttention, mask_weights
from .injection_hooks import Method, sigma_reader, states_within
from .zimage_model import direction_in_model_space, embed_like_caption


class CaptionStream(Method):
    traits = MethodTraits("caption_stream", caption_stream=True)
    patches = ("double_block",)

    def prepare(self, inj, st, call):
        length = inject.padded_length(call.c_crossattn.shape[1], st.dit.pad_tokens_multiple)
        st.caption = self.caption_tokens(inj, st, length, call.x.device, call.base.get_dtype_inference())

    @staticmethod
    def caption_tokens(inj, st, length: int, device, dtype):
        """[1, length, D]: the VL features area-pooled to the caption slice length, embedded like the caption."""
        def make():
            feats = pooling.match_length(inj.tokens, length, "pool").to(device=device, dtype=dtype)
            return embed_like_caption(st.dit, feats, st.opts)[0][:, :length]

        return inj.cached(("caption", id(st.dit), str(device), dtype, length), st.uuid, make)

    def double_block(self, inj, st, args):
        w = inj.block_weight(st, args["block_index"])
        if w == 0.0:
            return {}
        txt = args["txt"]
        vl = st.caption
        if vl is None or vl.shape[1] != txt.shape[1] or vl.dtype != txt.dtype or vl.device != txt.device:
            # something between the wrapper and the model changed the caption: embed for what arrived
            vl = st.caption = self.caption_tokens(inj, st, txt.shape[1], txt.device, txt.dtype)
        mode = inj.settings.caption_mode
        if inject.inplace_ok(txt):
            inject.caption_update_(txt, vl, w, mode, st.rows)
            return {}
        return {"txt": inject.caption_update(txt, vl, w, mode, st.rows)}


class Concat(Method):
    traits = MethodTraits("concat", log_strength=True)

    def inner_attention(self, inj, st, func, w):
        """The block's own attention with log(w) added to the appended tokens' logits (w = 1: func itself; w = 0:
        the block ignores them), handed down the override chain so other overrides see the biased attention."""
        if w == 1.0:
            return func
        start, n = st.vl
        value = math.log(w) if w > 0 else -math.inf

        def biased(q, k, v, heads, mask=None, *args, **kwargs):
            bias = torch.zeros(k.shape[2], device=q.device, dtype=q.dtype)
            bias[start:start + n] = value
            full = bias.view(1, 1, 1, -1).expand(q.shape[0], 1, q.shape[2], -1)
            return func(q, k, v, heads, full if mask is None else full + mask, *args, **kwargs)

        biased.zimage_vl_base = getattr(func, "zimage_vl_base", func)  # for other attention over other keys
        return biased

    def run(self, inj, call, rows):
        # the caption length must be decided before the call: read the sigma now (no read when always on)
        factor = None if inj.always_on else inj.step_factor(call.base.model_sampling,
                                                             sigma_reader(call.to.get("sigmas", call.t))())
        if factor == 0.0:
            return call.run()
        c = call.c_crossattn
        vl = inj.cached(("concat", str(c.device), c.dtype), None,
                        lambda: inject.pool_to_budget(inj.tokens, inj.settings.token_budget).to(c.device, c.dtype))
        to = call.to
        if not (inj.always_on and all(s == 1.0 for s in inj.block_scale)):  # a bias somewhere: the override
            st, to = inj.new_state(call, rows, factor)
            st.vl = (c.shape[1], vl.shape[1])  # key columns of the appended tokens
            st.prev_override = call.to.get("optimized_attention_override")
            to["optimized_attention_override"] = inj.attention_override
        batch = call.x.shape[0]
        if inject.rows_cover(rows, batch):
            ctx, kw = self.appended(vl, c, call.kwargs)
            return call.run(to, c_crossattn=ctx, kwargs=kw)
        # a CFG batch with only some chunks selected: Z-Image does not mask its caption, so the selected
        # rows run with the VL tokens appended and the others unchanged, one model call per segment
        if call.control is not None:
            raise ValueError("DiT Layer Injection: concat with apply_to=cond_only cannot split a CFG batch that "
                             "carries a ControlNet; use apply_to=both or method=extra_attention / caption_stream")
        chunks = len(call.to.get("cond_or_uncond") or [])

        def run_segment(s, e, selected):
            sub_to = states_within(to if selected else call.to, s, e)
            sub_to = dict(sub_to) if sub_to is call.to or sub_to is to else sub_to
            for key in ("cond_or_uncond", "uuids"):
                if key in call.to:
                    sub_to[key] = inject.cut_chunk_list(call.to[key], s, e, batch, chunks)
            kw = {k: inject.cut_batch(v, s, e, batch) for k, v in call.kwargs.items()}
            ctx = inject.cut_batch(c, s, e, batch)
            if selected:
                ctx, kw = self.appended(vl, ctx, kw)
            return call.run(sub_to, x=inject.cut_batch(call.x, s, e, batch), t=inject.cut_batch(call.t, s, e, batch),
                            c_concat=inject.cut_batch(call.c_concat, s, e, batch), c_crossattn=ctx, kwargs=kw)

        return inject.run_by_segments(rows, batch, run_segment)

    @staticmethod
    def appended(vl, ctx, kwargs):
        """The caption features with the VL tokens appended, and the call's mask / token count to match."""
        n = vl.shape[1]
        ctx = torch.cat([ctx, vl.expand(ctx.shape[0], -1, -1)], dim=1)
        kw = dict(kwargs)
        mask = kw.get("attention_mask")
        if torch.is_tensor(mask):
            kw["attention_mask"] = torch.cat([mask, mask.new_ones(mask.shape[0], n)], dim=-1)
        if isinstance(kw.get("num_tokens"), int):
            kw["num_tokens"] = kw["num_tokens"] + n
        return ctx, kw


class Steer(Method):
    """A steering direction added after each selected block to one stream: x ← x + w·m ⊙ rms(x_t)·d̂_t."""

    patches = ("double_block",)

    def __init__(self, target: str):
        self.target = target
        self.traits = MethodTraits(f"steer_{target}", caption_stream=target == "caption", regional=target == "image")

    def prepare(self, inj, st, call):
        dit, device, dtype = st.dit, call.x.device, call.base.get_dtype_inference()
        st.vl = inj.cached(("direction", id(dit), str(device), dtype), st.uuid,
                           lambda: direction_in_model_space(dit, inj.direction.to(device=device, dtype=dtype)))
        h, w = call.x.shape[-2:]
        p = dit.patch_size
        st.img_len = (-(-h // p)) * (-(-w // p))  # the real image tokens (the pad tokens after them stay)
        st.token_weights = mask_weights(inj, st, call)

    def double_block(self, inj, st, args):
        w = inj.block_weight(st, args["block_index"])
        if w == 0.0:
            return {}
        name = "txt" if self.target == "caption" else "img"
        x = args[name]
        direction = st.vl
        if self.target == "caption":
            direction = direction if direction.shape[0] == 1 else pooling.match_length(direction[None], x.shape[1],
                                                                                       "pool")[0]
            n = x.shape[1]
        else:
            direction = direction.mean(dim=0, keepdim=True)  # one direction for every image token
            n = st.img_len
        out = x if inject.inplace_ok(x) else x.clone()
        offset = 0
        for s, e in st.rows:
            weights = None if st.token_weights is None else st.token_weights[offset:offset + e - s, :n]
            out[s:e, :n] = inject_extra.steer_tokens(out[s:e, :n], direction, w, weights)
            offset += e - s
        return {} if out is x else {name: out}


METHODS: dict[str, Method] = {m.traits.name: m for m in (ExtraAttention(), CaptionStream(), Concat(),
                                                          ReferenceAttention(), Steer("caption"), Steer("image"))}


def method_named(name: str) -> Method:
    """The registered method called `name` (ValueError listing them otherwise)."""
    require_choice("method", name, tuple(METHODS))
    return METHODS[name]
