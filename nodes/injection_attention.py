"""The DiT Layer Injection methods that add attention to the image tokens of the selected blocks.

    extra_attention      the image queries also attend to the VL tokens, projected with that block's own
                         norm → adaLN scale → qkv → k-norm (a noise_refiner patch records the adaLN input vec)
    reference_attention  the image queries also attend to a reference latent's own image tokens, which run
                         through the model's embedding, refiners and blocks at the step's σ (`matched`, fixed
                         noise seed; advanced block by block alongside the generation, only as deep as the
                         deepest block that acts) or clean (σ = 0, keys/values computed once per run and
                         cached); the VL tokens, when connected, are added as in extra_attention

Both: `share` add (a separate softmax per source, scaled) or joint (one softmax over [own keys; reference
keys + log w]); `kv_scale`; per-reference weights of a VL_EMBEDS from Combine References (concat) as log
masses in one softmax; a negative VL reference subtracted (out += w·(attn(ref) − w_neg·attn(neg))); an
optional MASK as per image-token weights. The math is in vl_core.inject_extra.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..vl_core import inject, inject_extra
from ..vl_core.inject_settings import MethodTraits
from .injection_hooks import Method, plain_options
from .zimage_model import block_keys_values, embed_like_caption, reference_pass

log = logging.getLogger(__name__)


def mask_weights(inj, st, call) -> torch.Tensor | None:
    """[Σ selected rows, padded image tokens] weights of the injection's MASK on this call's latent grid (None
    without a mask); the grid per latent size is computed once."""
    if inj.mask is None:
        return None
    dit = st.dit
    h, w = call.x.shape[-2:]
    p = dit.patch_size
    padded = inject.image_token_count(h, w, p, dit.pad_tokens_multiple)
    grid = inj.cached(("mask", str(call.x.device), h, w), None,
                      lambda: inject_extra.mask_token_weights(inj.mask, -(-h // p), -(-w // p), padded).to(call.x.device))
    chunks = len(call.to.get("cond_or_uncond") or [1])
    return inject_extra.rows_token_weights(grid, st.rows, call.x.shape[0], chunks)


class AttentionMethod(Method):
    """Base: VL sources (positive with per-reference weights, negative), mask weights, the added attention."""

    patches = ("noise_refiner",)

    def prepare(self, inj, st, call):
        dit = st.dit
        h, w = call.x.shape[-2:]
        st.img_len = inject.image_token_count(h, w, dit.patch_size, dit.pad_tokens_multiple)
        st.vl = self.vl_tokens(inj, st, call.x.device, call.base.get_dtype_inference()) if inj.tokens is not None \
            else None
        st.token_weights = mask_weights(inj, st, call)

    @staticmethod
    def vl_tokens(inj, st, device, dtype):
        """(hidden [1, n+m, D], freqs, n, key bias [n] | None): the positive VL tokens (each reference pooled to its
        share of token_budget and embedded on its own, so the caption refiner never mixes two references) and
        the negative ones after them, embedded like a caption."""
        def make():
            budget = inj.settings.token_budget
            pos, spans = inject_extra.pool_spans(inj.tokens, inj.spans, budget)
            parts = [pos[:, s:e] for (s, e), _ in spans]
            if inj.negative is not None:
                parts.append(inject.pool_to_budget(inj.negative, budget))
            embedded = [embed_like_caption(st.dit, t.to(device=device, dtype=dtype), st.opts) for t in parts]
            hidden = torch.cat([e[0][:, :t.shape[1]] for e, t in zip(embedded, parts)], dim=1)
            freqs = torch.cat([e[1][:, :t.shape[1]] for e, t in zip(embedded, parts)], dim=1)
            bias = inject_extra.span_key_bias(spans, pos.shape[1])
            return hidden, freqs, pos.shape[1], None if bias is None else bias.to(device)

        return inj.cached(("attention", id(st.dit), str(device), dtype), st.uuid, make)

    def noise_refiner(self, inj, st, args):
        st.vec = args["vec"]
        return {}

    def vl_sources(self, inj, st, i, vec) -> list[inject_extra.Source]:
        """The VL keys/values of block i: the positives (one softmax, reference weights as a key bias) and the
        negatives (sign −w_neg)."""
        if st.vl is None:
            return []
        hidden, freqs, n, bias = st.vl
        k, v = block_keys_values(st.dit.layers[i], hidden, vec, freqs if inj.settings.vl_rope == "caption" else None)
        out = [inject_extra.Source(k[:, :, :n], v[:, :, :n], bias)]
        if k.shape[2] > n:
            out.append(inject_extra.Source(k[:, :, n:], v[:, :, n:], None, -inj.settings.negative_weight))
        return out

    def reference(self, inj, st, i, to) -> tuple[inject_extra.Source, torch.Tensor | None] | None:
        """(reference source, its queries for AdaIN | None) at block i, or None (no reference)."""
        return None

    def attention(self, inj, st, func, out, w, i, args, kwargs, to):
        q = args[0] if args else kwargs.get("q")
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if not torch.is_tensor(q) or q.ndim != 4 or not kwargs.get("skip_reshape", False) or out.ndim != 3:
            raise RuntimeError("DiT Layer Injection: Z-Image's attention was called with an unexpected layout "
                               f"(q {getattr(q, 'shape', None)}, skip_reshape={kwargs.get('skip_reshape')}); this "
                               f"ComfyUI version is not supported by {self.traits.name} — use caption_stream or concat")
        if st.vec is None:
            raise RuntimeError("DiT Layer Injection: the noise_refiner patch did not record the adaLN input; "
                               "another node replaced Z-Image's noise refiner patches")

        base = getattr(func, "zimage_vl_base", func)  # an outer concat's biased func is for the block's own keys

        def host_attention(q_, k_, v_, mask):
            return base(q_, k_, v_, heads, mask, skip_reshape=True, transformer_options=to, _inside_attn_wrapper=True)

        s = inj.settings
        start = q.shape[2] - st.img_len
        q_img = inject_extra.query_rows(q, st.rows, start)
        sources = self.vl_sources(inj, st, i, inject.gather_rows(st.vec, st.rows))
        ref = self.reference(inj, st, i, to)
        if ref is not None:
            ref_src, q_ref = ref
            if q_ref is not None:
                q_img = inject_extra.adain_tokens(q_img, q_ref)
            sources = [ref_src] + sources
        replace = None
        if s.share == "joint":
            k_own = inject.gather_rows(args[1], st.rows)
            v_own = inject.gather_rows(args[2], st.rows)
            if ref is not None and ref[1] is not None:  # StyleAligned: own image keys toward the reference's too
                k_own = k_own.clone()
                k_own[:, :, start:] = inject_extra.adain_tokens(k_own[:, :, start:], ref_src.k)
            replace = inject_extra.joint_attention(host_attention, q_img, k_own, v_own, sources[0], w)
            sources = sources[1:]
        terms = inject_extra.attention_terms(host_attention, q_img, sources, w, s.kv_scale)
        return inject_extra.accumulate_(out, terms, st.rows, start, st.token_weights, replace)


class ExtraAttention(AttentionMethod):
    traits = MethodTraits("extra_attention", attention=True, regional=True)


class _PassDone(Exception):
    """Raised from the deepest acting block's attention call once its keys/values are taken: the reference's
    pass stops there (the host's API has no way to run half a block)."""


class ReferenceAttention(AttentionMethod):
    traits = MethodTraits("reference_attention", attention=True, regional=True)

    def prepare(self, inj, st, call):
        super().prepare(inj, st, call)
        dtype = call.base.get_dtype_inference()
        h, w = call.x.shape[-2:]
        latent = inj.cached(("reference", str(call.x.device), dtype, h, w), None,
                            lambda: self.model_latent(inj, call.base, h, w).to(call.x.device))
        clean = inj.settings.reference_noise == "clean"
        if clean:
            sigma = torch.zeros_like(call.t[:1])
        else:
            sigma = call.t[:1]
            noise = inj.cached(("reference_noise", str(call.x.device), h, w), None,
                               lambda: self.noise(inj, latent).to(call.x.device))
            latent = call.base.model_sampling.noise_scaling(sigma, noise, latent)
        first = st.rows[0][0]
        st.ref = dict(latent=latent, sigma=sigma, caption=call.c_crossattn[first:first + 1], base=call.base,
                      num_tokens=call.kwargs.get("num_tokens"), walk=None,
                      run=call.to.get("sample_sigmas") if clean else None)

    @staticmethod
    def model_latent(inj, base, h: int, w: int) -> torch.Tensor:
        """The reference in the model's latent space at the generation's size (resized with a note if needed)."""
        ref = inj.reference
        if tuple(ref.shape[-2:]) != (h, w):
            if inj.note_once(("resize", h, w)):
                log.warning("DiT Layer Injection: reference latent %s resized to the generated latent's %dx%d "
                            "(bilinear in latent space; encode the reference at the output size to avoid it)",
                            "x".join(map(str, ref.shape[-2:])), h, w)
            ref = F.interpolate(ref, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return base.process_latent_in(ref)

    @staticmethod
    def noise(inj, latent: torch.Tensor) -> torch.Tensor:
        """Fixed noise of the reference (reference_seed, drawn on the CPU as comfy.sample.prepare_noise does)."""
        gen = torch.Generator().manual_seed(inj.reference_seed)
        return torch.randn(latent.shape, generator=gen, dtype=torch.float32).to(latent.dtype)

    def reference(self, inj, st, i, to):
        ref = st.ref
        if ref["run"] is not None:  # clean inside a sampling run: once per run and block (the first call's caption
            # serves the whole run); dropped with the run's sigmas tensor, which names the run
            key = ("reference_kv", i, id(st.dit), tuple(ref["caption"].shape), tuple(ref["latent"].shape), st.uuid)
            return inj.cached_for_run(ref["run"], key, lambda: self.walk_to(inj, st, i, to))
        return self.walk_to(inj, st, i, to)

    def walk_to(self, inj, st, i, to):
        """The reference's (source, queries | None) at block i: its pass is advanced through blocks ≤ i, block i's
        own attention handing over the keys/values it computed (so they are not projected twice)."""
        ref = st.ref
        walk = ref["walk"]
        if walk is None:
            opts = plain_options(to)
            img, mask, freqs, adaln, start, n_img = reference_pass(st.dit, ref["base"], ref["latent"], ref["sigma"],
                                                                   ref["caption"], ref["num_tokens"], opts)
            walk = ref["walk"] = dict(img=img, mask=mask, freqs=freqs, adaln=adaln, start=start, n=n_img, next=0,
                                      opts=opts, seen={})
        layers = st.dit.layers
        deepest = max(j for j, scale in enumerate(inj.block_scale) if scale != 0.0)
        s, n = walk["start"], walk["n"]
        keep = ref["run"] is not None  # cached for the run: own copies, not views of the block's qkv output
        adain = inj.settings.reference_adain
        while walk["next"] <= i:
            j = walk["next"]
            seen = walk["seen"]
            host = walk["opts"].get("optimized_attention_override")

            def capture(func, *args, _j=j, _host=host, **kwargs):
                q, k, v = args[:3]
                part = slice(s, s + n)
                if inj.block_scale[_j] != 0.0:  # only blocks that act: a passed block's qkv is dropped at once
                    picked = [None if x is None else x[:, :, part] for x in (q if adain else None, k, v)]
                    seen[_j] = [None if x is None else x.contiguous() for x in picked] if keep else picked
                if _j == deepest:  # nothing deeper needs this pass: skip the block's attention and feed-forward
                    raise _PassDone
                return _host(func, *args, **kwargs) if _host is not None else func(*args, **kwargs)

            opts = dict(walk["opts"], block_index=j, block_type="double", total_blocks=len(layers),
                        optimized_attention_override=capture)
            try:
                walk["img"] = layers[j](walk["img"], walk["mask"], walk["freqs"], walk["adaln"],
                                        transformer_options=opts)
            except _PassDone:
                walk["img"] = None  # the pass ends here; its hidden state is no longer needed
            walk["next"] = j + 1
        q, k, v = walk["seen"].pop(i)
        return inject_extra.Source(k, v), q


__all__ = ["AttentionMethod", "ExtraAttention", "ReferenceAttention", "mask_weights"]
