"""The DiT Layer Injection methods, one small class each, and the registry the node's `method` Combo lists.

A method says which ComfyUI patch lists it hooks (`patches`: a hook method of the same name is called with
the injection, its per-call state and the patch args), whether it needs the per-call attention override
(`attention`), what it prepares per model call (`prepare`) and what it does per selected block. The math is
in vl_core.inject; `traits` tell the settings how strength, block weights and schedule apply.

    caption_stream   after each selected main block the caption slice moves toward the VL tokens embedded
                     like a caption (in place when autograd / inference mode allow)
    extra_attention  the image queries of each selected block also attend to the VL tokens projected with
                     that block's own norm → adaLN scale → qkv → k-norm (a separate softmax, added before
                     the output projection); a noise_refiner patch records the adaLN input vec
    concat           the area-pooled VL features are appended to the raw caption features, which the model
                     then embeds itself (every block, while the window is open)
"""
from __future__ import annotations

import torch

from ..vl_core import inject, pooling
from ..vl_core.checks import require_choice
from ..vl_core.inject_settings import MethodTraits
from .injection_hooks import CallState, Injection, ModelCall, sigma_reader, states_within
from .zimage_model import block_keys_values, embed_like_caption


class Method:
    """Base: no hooks; runs the model call with this injection's state in transformer_options."""

    traits = MethodTraits("")
    patches: tuple[str, ...] = ()
    attention = None   # a method (inj, st, func, out, w, i, args, kwargs, to) -> out when it needs the override

    def run(self, inj: Injection, call: ModelCall, rows) -> object:
        state, to = inj.new_state(call, rows)
        if self.attention is not None:
            state.prev_override = call.to.get("optimized_attention_override")
            to["optimized_attention_override"] = inj.attention_override
        self.prepare(inj, state, call)
        return call.run(to)

    def prepare(self, inj: Injection, st: CallState, call: ModelCall) -> None:
        """Per model call, before the model runs: fill the state the hooks read."""


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


class ExtraAttention(Method):
    traits = MethodTraits("extra_attention")
    patches = ("noise_refiner",)

    def prepare(self, inj, st, call):
        dit, device, dtype = st.dit, call.x.device, call.base.get_dtype_inference()

        def make():
            feats = inject.pool_to_budget(inj.tokens, inj.settings.token_budget)
            n = feats.shape[1]
            hidden, freqs = embed_like_caption(dit, feats.to(device=device, dtype=dtype), st.opts)
            return hidden[:, :n], freqs[:, :n]

        st.hidden, st.freqs = inj.cached(("attention", id(dit), str(device), dtype), st.uuid, make)
        st.img_len = inject.image_token_count(call.x.shape[-2], call.x.shape[-1], dit.patch_size,
                                              dit.pad_tokens_multiple)

    def noise_refiner(self, inj, st, args):
        st.vec = args["vec"]
        return {}

    def attention(self, inj, st, func, out, w, i, args, kwargs, to):
        q = args[0] if args else kwargs.get("q")
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if not torch.is_tensor(q) or q.ndim != 4 or not kwargs.get("skip_reshape", False) or out.ndim != 3:
            raise RuntimeError("DiT Layer Injection: Z-Image's attention was called with an unexpected layout "
                               f"(q {getattr(q, 'shape', None)}, skip_reshape={kwargs.get('skip_reshape')}); this "
                               "ComfyUI version is not supported by extra_attention — use caption_stream or concat")
        if st.vec is None:
            raise RuntimeError("DiT Layer Injection: the noise_refiner patch did not record the adaLN input; "
                               "another node replaced Z-Image's noise refiner patches")
        freqs = st.freqs if inj.settings.vl_rope == "caption" else None
        k, v = block_keys_values(st.dit.layers[i], st.hidden, inject.gather_rows(st.vec, st.rows), freqs)

        def host_attention(q_, k_, v_):
            return func(q_, k_, v_, heads, None, skip_reshape=True, transformer_options=to, _inside_attn_wrapper=True)

        return inject.add_decoupled_attention(out, q, k, v, w, st.img_len, st.rows, attention=host_attention)


class Concat(Method):
    traits = MethodTraits("concat", weighted=False)

    def run(self, inj, call, rows):
        # the caption length must be decided before the call: read the sigma now (no read when always on)
        if not inj.always_on and inj.step_factor(call.base.model_sampling,
                                                 sigma_reader(call.to.get("sigmas", call.t))()) == 0.0:
            return call.run()
        c = call.c_crossattn
        vl = inj.cached(("concat", str(c.device), c.dtype), None,
                        lambda: inject.pool_to_budget(inj.tokens, inj.settings.token_budget).to(c.device, c.dtype))
        batch = call.x.shape[0]
        if inject.rows_cover(rows, batch):
            ctx, kw = self.appended(vl, c, call.kwargs)
            return call.run(c_crossattn=ctx, kwargs=kw)
        # a CFG batch with only some chunks selected: Z-Image does not mask its caption, so the selected
        # rows run with the VL tokens appended and the others unchanged, one model call per segment
        if call.control is not None:
            raise ValueError("DiT Layer Injection: concat with apply_to=cond_only cannot split a CFG batch that "
                             "carries a ControlNet; use apply_to=both or method=extra_attention / caption_stream")
        chunks = len(call.to.get("cond_or_uncond") or [])

        def run_segment(s, e, selected):
            sub_to = states_within(call.to, s, e)
            sub_to = dict(sub_to) if sub_to is call.to else sub_to
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


METHODS: dict[str, Method] = {m.traits.name: m for m in (ExtraAttention(), CaptionStream(), Concat())}


def method_named(name: str) -> Method:
    """The registered method called `name` (ValueError listing them otherwise)."""
    require_choice("method", name, tuple(METHODS))
    return METHODS[name]
