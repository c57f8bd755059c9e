"""DiT Layer Injection on a tiny Z-Image built from ComfyUI's own classes, sampled with the real sampler."""
from __future__ import annotations

import math
import sys

import pytest

METHODS = ("caption_stream", "extra_attention", "concat")
BLOCK_METHODS = ("caption_stream", "extra_attention")
SMALL = 32  # latent side for the tests that sample many times (the others use 64)
# README "DiT Layer Injection": concat + apply_to=cond_only runs the negative rows as their own model call, so
# against the batched CFG call they differ by batch-size rounding, max|Δ| ≤ this × max|output| (measured
# ≤ 6.2e-7 on the tiny float32 model); against the plain model on the negative alone they are bit-identical.
CONCAT_NEGATIVE_BOUND = 2e-6


def apply(host, model, vl, **settings):
    settings.setdefault("strength", 0.5)
    settings.setdefault("block_weights", "all")
    return host.injection.apply_injection(model, vl, **settings)


def bits_equal(a, b) -> bool:
    """Same shape, dtype and raw bits (so -0.0 != +0.0 and NaNs compare by payload)."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def snapshot(model, torch):
    """Weights (cloned) and a structural copy of model_options (ids of callables, shapes of tensors)."""
    def walk(o):
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        if torch.is_tensor(o):
            return ("tensor", tuple(o.shape), o.clone())
        return ("obj", id(o), repr(type(o)))

    weights = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    return weights, walk(model.model_options), walk(model.wrappers), dict(model.object_patches), \
        {k: list(v) for k, v in model.patches.items()}, model.patches_uuid


def same_snapshot(a, b, torch) -> bool:
    def eq(x, y):
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return isinstance(y, list) and len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        if isinstance(x, tuple) and x and x[0] == "tensor":
            return isinstance(y, tuple) and x[1] == y[1] and bits_equal(x[2], y[2])
        return x == y

    wa, *ra = a
    wb, *rb = b
    return wa.keys() == wb.keys() and all(bits_equal(wa[k], wb[k]) for k in wa) and eq(ra[0], rb[0]) and \
        eq(ra[1], rb[1]) and ra[2] == rb[2] and ra[3].keys() == rb[3].keys() and ra[4] == rb[4]


# --------------------------------------------------------------------------- exactness where nothing is injected

@pytest.mark.parametrize("method", BLOCK_METHODS)
def test_blocks_before_the_selection_are_bit_identical(host, base, vl, method):
    plain = base.clone()
    observer = host.DoubleBlockObserver()
    plain.set_model_double_block_patch(observer)  # before ours in the patch list: sees each block's own output
    ref_obs = host.DoubleBlockObserver()
    ref_model = base.clone()
    ref_model.set_model_double_block_patch(ref_obs)
    host.sample(ref_model, steps=2)
    host.sample(apply(host, plain, vl, method=method, block_weights="2"), steps=2)
    assert len(observer.calls) == len(ref_obs.calls) == 2
    first, ref = observer.calls[0], ref_obs.calls[0]
    for j in (0, 1):
        assert bits_equal(first[j][0], ref[j][0]) and bits_equal(first[j][1], ref[j][1]), f"block {j} changed"
    img_same = bits_equal(first[2][0], ref[2][0])
    # caption_stream acts after block 2 (its own output is untouched); extra_attention acts inside it
    assert img_same == (method == "caption_stream")
    assert not bits_equal(first[3][0], ref[3][0]), "block 3 should see the injection"


@pytest.mark.parametrize("method", BLOCK_METHODS)
def test_unselected_blocks_compute_exactly_the_unpatched_block(host, base, vl, method):
    """Every block of weight 0 maps its (possibly changed) input exactly as the plain block does."""
    torch = host.torch
    model = apply(host, base, vl, method=method, block_weights="1:1.0, 3:0.7", strength=0.8)
    dit = base.model.diffusion_model
    with host.BlockRecorder(dit) as rec:
        host.sample(model, steps=2)
    assert len(rec.records) == 2
    with torch.inference_mode():
        for call in rec.records:
            for j, r in call.items():
                opts = {k: v for k, v in r["options"].items() if k != "optimized_attention_override"}
                again = dit.layers[j](r["x"], r["mask"], r["freqs"], r["vec"], transformer_options=opts)
                if j in (0, 2) or method == "caption_stream":
                    assert bits_equal(again, r["out"]), f"block {j} ({method}) is not the plain block"
                else:
                    assert not torch.equal(again, r["out"]), f"selected block {j} was not changed"


@pytest.mark.parametrize("method", BLOCK_METHODS)
def test_zero_scale_is_bit_identical(host, base, vl, method):
    """Hooks installed but every block weight 0 (the node refuses this; the hooks must still be exact no-ops)."""
    ref = host.sample(base, steps=3, size=SMALL)
    inj = host.injection.build_injection(base, vl, method=method, strength=1.0, block_weights="all")
    inj.block_scale = [0.0] * len(inj.block_scale)
    model = base.clone()
    host.injection.install_injection(model, inj)
    assert bits_equal(host.sample(model, steps=3, size=SMALL), ref)


@pytest.mark.parametrize("method", METHODS)
def test_steps_outside_the_window_are_identical(host, base, vl, method):
    """Custom sigmas around the window [start 0.4, end 0.7] (shift 3: sigma 0.818 .. 0.5625)."""
    plain = base.clone()
    rec = host.CallRecorder()
    plain.set_model_unet_function_wrapper(rec)
    model = apply(host, plain, vl, method=method, start_percent=0.4, end_percent=0.7)
    ms = base.get_model_object("model_sampling")
    s_start, s_end = ms.percent_to_sigma(0.4), ms.percent_to_sigma(0.7)
    sigmas = [1.0, 0.9, 0.75, 0.6, 0.45, 0.2, 0.0]
    host.sample(model, sigmas=sigmas, size=SMALL)
    assert len(rec.calls) == len(sigmas) - 1
    for call in rec.calls:
        inside = s_end <= call["sigma"] <= s_start
        assert bits_equal(call["out"], call["ref"]) != inside, (call["sigma"], inside)


def test_schedule_zero_point_is_identical(host, base, vl):
    """linear_up is 0 at the window start: a step exactly there is untouched, later steps are not."""
    plain = base.clone()
    rec = host.CallRecorder()
    plain.set_model_unet_function_wrapper(rec)
    model = apply(host, plain, vl, method="caption_stream", schedule_name="linear_up")
    host.sample(model, sigmas=[1.0, 0.8, 0.5, 0.0], size=SMALL)
    assert bits_equal(rec.calls[0]["out"], rec.calls[0]["ref"])
    assert not bits_equal(rec.calls[1]["out"], rec.calls[1]["ref"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("apply_to", ["cond_only", "both"])
def test_cond_only_leaves_the_unconditional_half_untouched(host, base, vl, method, apply_to):
    torch = host.torch
    plain = base.clone()
    rec = host.CallRecorder()
    plain.set_model_unet_function_wrapper(rec)
    model = apply(host, plain, vl, method=method, apply_to=apply_to)
    host.sample(model, steps=3, cfg=3.0, size=SMALL)
    assert rec.calls and all(sorted(c["cond_or_uncond"]) == [0, 1] for c in rec.calls), "expected CFG batches"
    for call in rec.calls:
        out, ref = rec.chunks(call, "out"), rec.chunks(call, "ref")
        assert not torch.equal(out[0], ref[0]), "the conditional half was not injected"
        if apply_to == "both":
            assert not torch.equal(out[1], ref[1])
        elif method == "concat":  # the uncond rows run as their own sub-batch: equal up to batch-size rounding
            assert (out[1] - ref[1]).abs().max() <= CONCAT_NEGATIVE_BOUND * ref[1].abs().max()
        else:
            assert bits_equal(out[1], ref[1]), "the unconditional half changed"


def test_concat_cond_only_uncond_rows_match_an_uncond_only_call(host, base, vl):
    """The split path runs the unconditional rows alone: they equal the plain model on those rows alone."""
    torch = host.torch
    plain = base.clone()
    rec = host.CallRecorder()
    plain.set_model_unet_function_wrapper(rec)
    model = apply(host, plain, vl, method="concat", token_budget=16)
    host.sample(model, steps=2, cfg=3.0, size=SMALL)
    call = rec.calls[0]
    dm = base.model
    i_unc = call["cond_or_uncond"].index(1)
    x = call["input"].chunk(2)[i_unc]
    neg = host.make_cond(seed=3)[0][0]
    with torch.inference_mode():
        alone = dm.apply_model(x, torch.full((1,), call["sigma"]), c_crossattn=neg, num_tokens=neg.shape[1],
                               transformer_options={"cond_or_uncond": [1], "sigmas": torch.full((1,), call["sigma"])})
    assert bits_equal(rec.chunks(call, "out")[1], alone)


# --------------------------------------------------------------------------- the math of each method

@pytest.mark.parametrize("mode", ["lerp", "add"])
@pytest.mark.parametrize("schedule_name", ["constant", "cosine"])
def test_caption_stream_moves_the_caption_slice(host, base, vl, mode, schedule_name):
    """After a selected block: txt' = txt + w·(e − txt) (lerp) or txt + w·e (add), e = VL embedded like the caption,
    w = strength × block weight × schedule factor; the image slice is untouched by the patch itself."""
    torch = host.torch
    inj_mod = host.injection
    before, after = host.DoubleBlockObserver(), host.DoubleBlockObserver()
    plain = base.clone()
    plain.set_model_double_block_patch(before)
    model = apply(host, plain, vl, method="caption_stream", block_weights="1:0.5, 2:1.5", strength=0.4,
                  caption_mode=mode, schedule_name=schedule_name, start_percent=0.1, end_percent=0.9)
    model.set_model_double_block_patch(after)  # after ours
    sigmas = [1.0, 0.8, 0.5, 0.0]
    host.sample(model, sigmas=sigmas, size=SMALL)
    ms = base.get_model_object("model_sampling")
    window = host.injection.schedule.TimestepWindow(0.1, 0.9, schedule_name)
    dit = base.model.diffusion_model
    cap_len = before.calls[0][0][1].shape[1]
    with torch.inference_mode():
        feats = host.injection.pooling.match_length(vl.tokens().float(), cap_len, "pool")
        e = inj_mod.embed_like_caption(dit, feats, {})[0]
    for sigma, pre_call, post_call in zip(sigmas, before.calls, after.calls):
        factor = window.factor(sigma, ms.percent_to_sigma)
        for j in range(4):
            pre_img, pre_txt = pre_call[j]
            post_img, post_txt = post_call[j]
            w = 0.4 * {1: 0.5, 2: 1.5}.get(j, 0.0) * factor
            assert bits_equal(pre_img, post_img)
            if w == 0:
                assert bits_equal(pre_txt, post_txt)
                continue
            want = pre_txt + w * (e - pre_txt) if mode == "lerp" else pre_txt + w * e
            torch.testing.assert_close(post_txt, want, rtol=1e-5, atol=1e-5)
    assert any(window.factor(s, ms.percent_to_sigma) == 0 for s in sigmas)  # the window excluded some step


def test_vl_embedding_is_exactly_the_models_caption_path(host, base):
    """embed_like_caption on the caption features reproduces the model's own refined caption bit for bit."""
    torch = host.torch
    dit = base.model.diffusion_model
    seen = []
    handle = dit.context_refiner[-1].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        cond = host.make_cond(tokens=20)
        host.sample(base, steps=1, positive=cond)
    finally:
        handle.remove()
    with torch.inference_mode():
        mine = host.injection.embed_like_caption(dit, cond[0][0], {})[0]
    assert mine.shape[1] == 32  # padded to pad_tokens_multiple like the caption
    assert bits_equal(mine, seen[0])


@pytest.mark.parametrize("vl_rope", ["none", "caption"])
def test_extra_attention_matches_an_independent_reference(host, base, vl, vl_rope):
    """At the selected block the attention output (before the output projection) is
    plain + w·softmax(q_img·k_vlᵀ/√d)·v_vl, with k_vl/v_vl computed here from the block's weights by hand.
    A pre-existing optimized_attention_override keeps running (ours chains it)."""
    torch = host.torch
    F = torch.nn.functional
    dit = base.model.diffusion_model
    blk = dit.layers[1]
    captured = {}
    calls = {"prev": 0}

    def prev_override(func, *args, **kwargs):
        calls["prev"] += 1
        to = kwargs["transformer_options"]
        if to.get("block_type") == "double" and to.get("block_index") == 1:
            captured.setdefault("q", args[0].detach().clone())
        return func(*args, **kwargs)

    vecs = []
    plain = base.clone()
    plain.model_options["transformer_options"]["optimized_attention_override"] = prev_override
    plain.set_model_noise_refiner_patch(lambda a: vecs.append(a["vec"]) or {})
    budget = 12
    model = apply(host, plain, vl, method="extra_attention", block_weights="1", strength=0.7, token_budget=budget,
                  vl_rope=vl_rope)
    outs = []
    handle = blk.attention.out.register_forward_pre_hook(lambda m, a: outs.append(a[0].detach().clone()))
    try:
        host.sample(model, steps=1)
        host.sample(plain, steps=1)
    finally:
        handle.remove()
    assert calls["prev"] > 0
    got, plain_out = outs
    q = captured["q"]
    with torch.inference_mode():
        feats = host.injection.pooling.match_length(vl.tokens().float(), budget, "pool")
        hidden, freqs = host.injection.embed_like_caption(dit, feats, {})
        hidden, freqs = hidden[:, :budget], freqs[:, :budget]
        scale_msa = F.linear(vecs[0], blk.adaLN_modulation[0].weight, blk.adaLN_modulation[0].bias).chunk(4, dim=1)[0]
        n1 = blk.attention_norm1
        h = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + n1.eps) * n1.weight
        h = h * (1 + scale_msa[:, None])
        heads, d = blk.attention.n_local_heads, blk.attention.head_dim
        qkv = h @ blk.attention.qkv.weight.T
        k = qkv[..., heads * d:2 * heads * d].reshape(1, budget, heads, d)
        v = qkv[..., 2 * heads * d:].reshape(1, budget, heads, d)
        kn = blk.attention.k_norm
        eps = kn.eps if kn.eps is not None else torch.finfo(torch.float32).eps  # the model's rule
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * kn.weight
        if vl_rope == "caption":  # Z-Image RoPE: axis 0 (first 32 head dims) at positions 1..n, θ = 256
            pos = torch.arange(budget, dtype=torch.float64) + 1
            omega = 1.0 / (256.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))
            angle = (pos[:, None] * omega[None]).float()  # [n, 16]
            cos = torch.ones(budget, d // 2)
            sin = torch.zeros(budget, d // 2)
            cos[:, :16], sin[:, :16] = angle.cos(), angle.sin()
            cos, sin = cos[None, :, None], sin[None, :, None]
            pairs = k.reshape(1, budget, heads, d // 2, 2)
            a, b = pairs[..., 0], pairs[..., 1]
            k = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(1, budget, heads, d)
        img_len = 32 * 32
        q_img = q[:, :, -img_len:]
        att = torch.softmax(q_img @ k.movedim(1, 2).transpose(-1, -2) / math.sqrt(d), dim=-1) @ v.movedim(1, 2)
        extra = att.transpose(1, 2).reshape(1, img_len, heads * d)
    want = plain_out.clone()
    want[:, -img_len:] += 0.7 * extra
    assert bits_equal(got[:, :-img_len], plain_out[:, :-img_len]), "caption rows must be untouched"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_concat_equals_appending_the_pooled_tokens_to_the_conditioning(host, base, vl):
    torch = host.torch
    budget = 24
    cond = host.make_cond(tokens=20)
    pooled = host.injection.pooling.match_length(vl.tokens().float(), budget, "pool")
    appended = [[torch.cat([cond[0][0], pooled], dim=1), {}]]
    want = host.sample(base, steps=3, positive=appended)
    got = host.sample(apply(host, base, vl, method="concat", token_budget=budget, strength=1.0), steps=3,
                      positive=cond)  # strength 1: no log-strength bias
    assert bits_equal(got, want)
    assert not bits_equal(got, host.sample(base, steps=3, positive=cond))


def test_several_images_are_used_together(host, base):
    vl2 = host.make_vl(tokens=10, batch=2, seed=5)
    inj = host.injection.build_injection(base, vl2, method="extra_attention", strength=0.5, block_weights="all",
                                         token_budget=0)
    assert tuple(inj.tokens.shape) == (1, 20, 256)
    out = host.sample(apply(host, base, vl2, method="extra_attention", token_budget=0), steps=2, size=SMALL)
    assert host.torch.isfinite(out).all()


# --------------------------------------------------------------------------- patcher hygiene

@pytest.mark.parametrize("method", METHODS)
def test_original_model_is_unchanged_by_sampling_the_clone(host, vl, method):
    torch = host.torch
    model = host.make_model(seed=0)
    before = snapshot(model, torch)
    ref = host.sample(model, steps=2)
    patched = apply(host, model, vl, method=method)
    host.sample(patched, steps=2, cfg=2.0)
    assert same_snapshot(before, snapshot(model, torch), torch)
    assert bits_equal(host.sample(model, steps=2), ref)


@pytest.mark.parametrize("method", METHODS)
def test_applying_twice_equals_applying_once(host, base, vl, method):
    once = apply(host, base, vl, method=method)
    twice = apply(host, once, vl, method=method)
    wrappers = twice.get_wrappers(host.comfy.patcher_extension.WrappersMP.APPLY_MODEL, host.injection.PATCH_KEY)
    assert len(wrappers) == 1
    for name in ("double_block", "noise_refiner"):
        ours = [p for p in host.patches_of(twice, name) if getattr(p, "zimage_vl_key", None)]
        assert len(ours) == len([p for p in host.patches_of(once, name) if getattr(p, "zimage_vl_key", None)]) <= 1
    assert bits_equal(host.sample(twice, steps=2, size=SMALL), host.sample(once, steps=2, size=SMALL))


def test_reapplying_with_another_method_replaces_ours_only(host, base, vl):
    plain = base.clone()
    observer = host.DoubleBlockObserver()
    plain.set_model_double_block_patch(observer)
    first = apply(host, plain, vl, method="caption_stream")
    second = apply(host, first, vl, method="extra_attention")
    assert host.patches_of(second, "double_block") == [observer]
    assert len([p for p in host.patches_of(second, "noise_refiner") if getattr(p, "zimage_vl_key", None)]) == 1
    direct = apply(host, plain, vl, method="extra_attention")
    assert bits_equal(host.sample(second, steps=2, size=SMALL), host.sample(direct, steps=2, size=SMALL))


def test_other_patches_and_wrappers_survive_and_run(host, base, vl):
    pe = host.comfy.patcher_extension
    plain = base.clone()
    observer = host.DoubleBlockObserver()
    plain.set_model_double_block_patch(observer)
    seen = {"diffusion_model": 0, "apply_model": 0}

    def dm_wrapper(executor, *args, **kwargs):
        seen["diffusion_model"] += 1
        return executor(*args, **kwargs)

    def am_wrapper(executor, *args, **kwargs):
        seen["apply_model"] += 1
        return executor(*args, **kwargs)

    plain.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "someone_else", dm_wrapper)
    plain.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "someone_else", am_wrapper)
    for method in METHODS:
        observer.calls.clear()
        seen.update(diffusion_model=0, apply_model=0)
        model = apply(host, plain, vl, method=method)
        assert model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, "someone_else") == [dm_wrapper]
        assert model.get_wrappers(pe.WrappersMP.APPLY_MODEL, "someone_else") == [am_wrapper]
        assert host.patches_of(model, "double_block")[0] is observer
        host.sample(model, steps=2, size=SMALL)
        assert seen == {"diffusion_model": 2, "apply_model": 2} and len(observer.calls) == 2, method


@pytest.mark.parametrize("method", METHODS)
def test_lora_weight_patch_on_the_input_survives(host, base, vl, method):
    """A diff patch on cap_embedder (LoRA-style add_patches) stays on the clone, and the VL embedding sees it:
    the result equals the injection on a model whose weights hold the same change."""
    torch = host.torch
    key = "diffusion_model.cap_embedder.1.weight"
    w = base.model.diffusion_model.cap_embedder[1].weight
    delta = 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(7))
    lora = base.clone()
    lora.add_patches({key: (delta,)}, 1.0)
    patched = apply(host, lora, vl, method=method)
    assert key in patched.patches
    got = host.sample(patched, steps=2, size=SMALL)
    baked = host.make_model(seed=0)
    with torch.no_grad():
        baked.model.diffusion_model.cap_embedder[1].weight.add_(delta)
    want = host.sample(apply(host, baked, vl, method=method), steps=2, size=SMALL)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, host.sample(apply(host, base, vl, method=method), steps=2, size=SMALL))


def test_vl_cache_follows_weight_patches_added_downstream(host, base, vl):
    """A LoRA added AFTER the node (on a clone that shares our hooks) must not reuse embeddings of the old weights."""
    torch = host.torch
    patched = apply(host, base, vl, method="caption_stream")
    host.sample(patched, steps=2, size=SMALL)  # fills the cache with the plain weights
    key = "diffusion_model.context_refiner.0.attention.qkv.weight"
    w = base.model.diffusion_model.context_refiner[0].attention.qkv.weight
    delta = 0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(8))
    downstream = patched.clone()
    downstream.add_patches({key: (delta,)}, 1.0)
    got = host.sample(downstream, steps=2, size=SMALL)
    fresh = base.clone()
    fresh.add_patches({key: (delta,)}, 1.0)
    want = host.sample(apply(host, fresh, vl, method="caption_stream"), steps=2, size=SMALL)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- refusals

def test_refuses_a_model_that_is_not_zimage(host, vl):
    with pytest.raises(ValueError, match="Z-Image"):
        apply(host, host.flux_model(), vl, method="extra_attention")


def test_refuses_a_lumina2_model_of_the_same_widths(host, vl):
    """Lumina 2 is the same NextDiT class with a caption embedder of the same width here: refused by its model
    config (what ComfyUI's detection picked), not by width."""
    model = host.lumina2_model()
    dit = model.get_model_object("diffusion_model")
    assert isinstance(dit, host.comfy.ldm.lumina.model.NextDiT) and dit.cap_embedder[1].in_features == vl.width
    for method in METHODS:
        with pytest.raises(ValueError, match="needs a Z-Image model, got a Lumina2 NextDiT"):
            apply(host, model, vl, method=method)


def test_refuses_a_width_mismatch(host, base):
    wide = host.make_vl(width=384)
    with pytest.raises(ValueError) as e:
        apply(host, base, wide, method="caption_stream")
    msg = str(e.value)
    assert "384" in msg and "256" in msg and "Qwen3-VL-4B" in msg and "cap_embedder" in msg


@pytest.mark.parametrize("settings", [dict(block_weights="0-3:0"), dict(strength=0.0), dict(block_weights="all:0")])
@pytest.mark.parametrize("method", METHODS)
def test_strength_zero_installs_nothing_and_removes_this_applications_hooks(host, base, vl, settings, method):
    plain = host.sample(base, steps=2, size=SMALL, cfg=2.0)
    on = apply(host, base, vl, method=method, node_id="7")
    off = apply(host, on, vl, method=method, node_id="7", **settings)  # the same node re-run at strength 0
    for name in ("noise_refiner", "double_block"):
        assert host.patches_of(off, name) == host.patches_of(base, name)
    assert not off.get_wrappers(host.comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                                host.injection.injection_key("7"))
    assert bits_equal(host.sample(off, steps=2, size=SMALL, cfg=2.0), plain)


def test_refuses_nan_vl(host, base):
    bad = host.make_vl()
    bad.hidden[30][0, 3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        apply(host, base, bad, method="extra_attention")


@pytest.mark.parametrize("spec, match", [("4", "4 main blocks"), ("0-9", "4 main blocks"), ("early:x", "not a number"),
                                         ("-1", "negative"), ("", "empty"), ("top", "unknown block preset")])
def test_refuses_bad_block_weights(host, base, vl, spec, match):
    with pytest.raises(ValueError, match=match):
        apply(host, base, vl, method="caption_stream", block_weights=spec)


def test_refuses_an_empty_window(host, base, vl):
    with pytest.raises(ValueError, match="start_percent"):
        apply(host, base, vl, method="extra_attention", start_percent=0.6, end_percent=0.6)


def test_node_schema_and_execute(host, base, vl):
    node = host.injection.DiTInjection
    schema = node.define_schema()
    assert schema.node_id == "ZImageVL_DiTInjection" and schema.display_name == "DiT Layer Injection"
    ids = [i.id for i in schema.inputs]
    assert ids[:2] == ["model", "vl_embeds"] and "method" in ids and "block_weights" in ids
    out = node.execute(model=base, vl_embeds=vl, method="caption_stream", strength=0.3, block_weights="middle",
                       caption_mode="lerp", start_percent=0.0, end_percent=1.0, schedule="constant",
                       apply_to="cond_only", token_budget=256, vl_rope="none")
    patched = out.result[0]
    assert patched is not base and patched.get_wrappers(host.comfy.patcher_extension.WrappersMP.APPLY_MODEL,
                                                        host.injection.PATCH_KEY)


# --------------------------------------------------------------------------- sigma reads

def test_sigma_is_read_once_per_call_and_not_at_all_for_the_whole_run(host, base, vl, monkeypatch):
    calls = []
    hooks = sys.modules[host.injection.__package__ + ".injection_hooks"]
    methods = sys.modules[host.injection.__package__ + ".injection_methods"]
    real = hooks.sigma_reader

    def spy(sigmas):
        calls.append(float(sigmas.reshape(-1)[0]))
        return real(sigmas)

    monkeypatch.setattr(hooks, "sigma_reader", spy)
    monkeypatch.setattr(methods, "sigma_reader", spy)
    for method in METHODS:
        host.sample(apply(host, base, vl, method=method), steps=2, size=SMALL)
    assert calls == []  # full window, constant schedule: no sigma read at all
    host.sample(apply(host, base, vl, method="caption_stream", schedule_name="cosine"), steps=2, size=SMALL)
    host.sample(apply(host, base, vl, method="concat", end_percent=0.9), steps=2, size=SMALL)
    assert len(calls) == 4  # one per model call


def test_sigma_reader(host):
    torch = host.torch
    assert host.injection.sigma_reader(torch.tensor([0.25, 0.5]))() == 0.25
    assert host.injection.sigma_reader(0.75)() == 0.75
