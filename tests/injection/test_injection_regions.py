"""DiT Layer Injection, second generation, on the tiny Z-Image (ComfyUI's classes, the real sampler): reference-latent
attention, regional masks, negative and weighted references, steering inside blocks, the strength shapes."""
from __future__ import annotations

import logging

import pytest

from tests.injection.test_injection import SMALL, apply, bits_equal

BLOCK = 2  # the one selected block of the exactness tests (blocks 0-1 before it are untouched)


@pytest.fixture(scope="module")
def ref_latent(host):
    g = host.torch.Generator().manual_seed(11)
    return {"samples": host.torch.randn(1, 16, SMALL, SMALL, generator=g)}


@pytest.fixture(scope="module")
def direction(host):
    steer = __import__(host.injection.__package__.rsplit(".", 1)[0] + ".vl_core.steer", fromlist=["VLDirection"])
    g = host.torch.Generator().manual_seed(12)
    return steer.VLDirection(vector=host.torch.randn(1, 256, generator=g), scale=1.0, layers=(30,), num_layers=36,
                             method="mean_diff")


def one_step(host, model, sigma=0.6, **kw):
    return host.sample(model, sigmas=host.torch.tensor([sigma, 0.0]), size=SMALL, **kw)


class AttentionTap:
    """Records, at one main block, the image queries the model computed and the attention output as the block
    uses it (the input of its output projection, after every override). Hooks removed on exit."""

    def __init__(self, host, model, block):
        self.host, self.dit, self.block = host, model.get_model_object("diffusion_model"), block
        self.q = self.out = None

    def override(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        if to.get("block_type") == "double" and to.get("block_index") == self.block and self.q is None:
            self.q = args[0].detach().clone()  # the first: a reference pass inside this block calls it again
        return func(*args, **kwargs)

    def __enter__(self):
        def pre(module, args):
            self.out = args[0].detach().clone()
        self.handle = self.dit.layers[self.block].attention.out.register_forward_pre_hook(pre)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def tapped(host, model, block=BLOCK):
    """A clone whose model_options carry the tap's override (so an injection applied after it chains it)."""
    tap = AttentionTap(host, model, block)
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = tap.override
    return m, tap



# --------------------------------------------------------------------------- nothing injected → bit-identical

@pytest.mark.parametrize("method, extra", [
    ("reference_attention", dict(reference_noise="matched")), ("reference_attention", dict(reference_noise="clean")),
    ("extra_attention", dict(share="joint")), ("steer_image", {}), ("steer_caption", {}),
])
@pytest.mark.parametrize("off", [dict(strength=0.0), dict(start_percent=0.99), dict(mask="zero")])
def test_nothing_injected_is_bit_identical(host, base, vl, ref_latent, direction, method, extra, off):
    if off.get("mask") and method == "steer_caption":
        pytest.skip("the caption is not regional: a mask is refused there")
    torch = host.torch
    plain = host.sample(base, steps=2, size=SMALL, cfg=2.0)
    kw = dict(extra, **off)
    if kw.get("mask") == "zero":
        kw["mask"] = torch.zeros(1, 64, 64)
    inputs = {"reference": ref_latent} if method == "reference_attention" else \
        {"direction": direction} if method.startswith("steer") else {}
    model = apply(host, base, None if method.startswith("steer") else vl, method=method, **inputs, **kw)
    assert bits_equal(host.sample(model, steps=2, size=SMALL, cfg=2.0), plain), (method, off)


# --------------------------------------------------------------------------- masks

@pytest.mark.parametrize("method", ["extra_attention", "reference_attention"])
def test_masked_out_tokens_get_the_unpatched_attention_bit_for_bit(host, base, vl, ref_latent, method):
    torch = host.torch
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half of the image
    plain_m, plain_tap = tapped(host, base)
    with plain_tap:
        one_step(host, plain_m)
    inputs = {"reference": ref_latent} if method == "reference_attention" else {}
    m, tap = tapped(host, base)
    m = apply(host, m, vl, method=method, strength=0.9, block_weights=str(BLOCK), mask=mask, **inputs)
    with tap:
        one_step(host, m)
    img = SMALL // 2 * (SMALL // 2)
    left = torch.zeros(SMALL // 2, SMALL // 2, dtype=torch.bool)
    left[:, :SMALL // 4] = True
    got, want = tap.out[:, -img:], plain_tap.out[:, -img:]
    assert bits_equal(got[:, ~left.flatten()], want[:, ~left.flatten()])  # mask 0: untouched, bit for bit
    assert not torch.allclose(got[:, left.flatten()], want[:, left.flatten()])  # mask 1: changed
    assert bits_equal(tap.out[:, :-img], plain_tap.out[:, :-img])  # the caption rows are never touched


def test_a_mask_batch_that_does_not_match_is_refused(host, base, vl):
    model = apply(host, base, vl, method="extra_attention", mask=host.torch.ones(3, 16, 16))
    with pytest.raises(ValueError, match="mask has a batch of 3"):
        host.sample(model, steps=1, size=SMALL)


def test_two_masked_injections_put_two_references_in_two_regions(host, base, vl, ref_latent):
    torch = host.torch
    left = torch.zeros(1, 64, 64)
    left[..., :32] = 1
    vl2 = host.make_vl(tokens=24, seed=21)
    both = apply(host, apply(host, base, vl, method="extra_attention", mask=left, node_id="a", strength=0.9),
                 vl2, method="extra_attention", mask=1 - left, node_id="b", strength=0.9)
    one = apply(host, base, vl, method="extra_attention", mask=left, node_id="a", strength=0.9)
    out_both, out_one = host.sample(both, steps=2, size=SMALL), host.sample(one, steps=2, size=SMALL)
    assert not torch.allclose(out_both, out_one)


# --------------------------------------------------------------------------- references

def test_extra_attention_adds_the_reference_latents_own_attention(host, base, vl, ref_latent):
    """The added attention at a block equals w·softmax(q_img·k_refᵀ/√d)·v_ref, with k_ref/v_ref computed here from
    a genuine forward of the model on the noised reference (BlockRecorder), not from the pack's reference pass."""
    torch = host.torch
    sigma, w = 0.6, 0.7
    m, tap = tapped(host, base)
    m = apply(host, m, None, method="reference_attention", strength=w, block_weights=str(BLOCK), reference=ref_latent,
              reference_seed=5)
    plain_m, plain_tap = tapped(host, base)
    with plain_tap:
        one_step(host, plain_m, sigma)
    with tap:
        one_step(host, m, sigma)
    # the genuine forward on the reference: noised as the injection does, the positive caption, σ
    inner = base.model
    latent = inner.process_latent_in(ref_latent["samples"])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    s = torch.tensor([sigma])
    x_ref = inner.model_sampling.noise_scaling(s, noise, latent)
    cond = host.make_cond()[0][0]
    dit = base.get_model_object("diffusion_model")
    with host.BlockRecorder(dit) as rec, torch.inference_mode():
        inner.apply_model(x_ref, s, c_crossattn=cond, num_tokens=cond.shape[1])
    r = rec.records[-1][BLOCK]
    with torch.inference_mode():
        want, got = _expected_reference_attention(torch, dit, r, tap, plain_tap, w)
    assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max())), float((got - want).abs().max())


def _expected_reference_attention(torch, dit, r, tap, plain_tap, w):
    layer = dit.layers[BLOCK]
    attn = layer.attention
    scale = layer.adaLN_modulation(r["vec"]).chunk(4, dim=1)[0]
    h = attn.qkv(layer.attention_norm1(r["x"]) * (1 + scale.unsqueeze(1)))
    hd, nh = attn.head_dim, attn.n_local_heads
    k = attn.k_norm(h[..., nh * hd:2 * nh * hd].unflatten(-1, (nh, hd)))
    v = h[..., 2 * nh * hd:].unflatten(-1, (nh, hd))
    from comfy.ldm.flux.math import apply_rope
    k = apply_rope(k, k, r["freqs"])[1]
    img = (SMALL // 2) ** 2
    k_ref, v_ref = k[:, -img:].movedim(1, 2), v[:, -img:].movedim(1, 2)
    q_img = tap.q[:, :, -img:]
    want = w * torch.nn.functional.scaled_dot_product_attention(q_img, k_ref, v_ref).transpose(1, 2).flatten(2)
    return want, tap.out[:, -img:] - plain_tap.out[:, -img:]


def test_clean_and_matched_agree_near_sigma_zero(host, base, ref_latent):
    outs = [one_step(host, apply(host, base, None, method="reference_attention", strength=0.8, reference=ref_latent,
                                 reference_noise=mode), sigma=1e-5) for mode in ("matched", "clean")]
    plain = one_step(host, base, sigma=1e-5)
    assert host.torch.allclose(outs[0], outs[1], atol=1e-3 * float(outs[0].abs().max()))
    assert not host.torch.allclose(outs[0], plain)


def test_clean_reference_is_computed_once_per_run(host, base, ref_latent, monkeypatch):
    mod = __import__(host.injection.__package__ + ".injection_attention", fromlist=["reference_pass"])
    calls = []
    real = mod.reference_pass
    monkeypatch.setattr(mod, "reference_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    for mode, per_run in (("clean", 1), ("matched", 3)):
        calls.clear()
        host.sample(apply(host, base, None, method="reference_attention", reference=ref_latent, reference_noise=mode),
                    steps=3, size=SMALL)
        assert len(calls) == per_run, mode


def test_reference_of_another_size_is_resized_with_a_note(host, base, ref_latent, caplog):
    big = {"samples": host.torch.nn.functional.interpolate(ref_latent["samples"], scale_factor=2)}
    with caplog.at_level(logging.WARNING):
        out = host.sample(apply(host, base, None, method="reference_attention", reference=big), steps=2, size=SMALL)
    assert host.torch.isfinite(out).all()
    assert sum("resized to the generated latent" in r.message for r in caplog.records) == 1


def test_share_joint_and_adain_act_and_differ(host, base, ref_latent):
    outs = {}
    for name, kw in (("add", {}), ("joint", dict(share="joint")), ("adain", dict(reference_adain=True)),
                     ("joint_adain", dict(share="joint", reference_adain=True))):
        outs[name] = host.sample(apply(host, base, None, method="reference_attention", strength=0.9,
                                       reference=ref_latent, **kw), steps=2, size=SMALL)
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not host.torch.allclose(outs[a], outs[b]), (a, b)


def test_a_negative_equal_to_the_positive_cancels(host, base, vl):
    plain = host.sample(base, steps=2, size=SMALL)
    model = apply(host, base, vl, method="extra_attention", strength=0.9, negative_vl_embeds=vl, negative_weight=1.0)
    # + w·attn − w·attn: float rounding only (the two terms are added one after the other)
    assert host.torch.allclose(host.sample(model, steps=2, size=SMALL), plain, atol=1e-5 * float(plain.abs().max()))
    half = apply(host, base, vl, method="extra_attention", strength=0.9, negative_vl_embeds=vl, negative_weight=0.5)
    assert not host.torch.allclose(host.sample(half, steps=2, size=SMALL), plain)


def test_per_reference_weights_of_a_concat_combination(host, base, vl):
    refs = __import__(host.injection.__package__.rsplit(".", 1)[0] + ".vl_core.references",
                      fromlist=["combine_references"])
    other = host.make_vl(tokens=30, seed=31)
    only_first = refs.combine_references([vl, other], [1.0, 0.0], mode="concat")
    alone = host.sample(apply(host, base, vl, method="extra_attention", token_budget=0), steps=2, size=SMALL)
    got = host.sample(apply(host, base, only_first, method="extra_attention", token_budget=0), steps=2, size=SMALL)
    assert host.torch.allclose(got, alone, atol=1e-5)  # weight 0: the second reference gets no attention mass
    mixed = refs.combine_references([vl, other], [1.0, 3.0], mode="concat")
    equal = refs.combine_references([vl, other], [1.0, 1.0], mode="concat")
    a = host.sample(apply(host, base, mixed, method="extra_attention", token_budget=0), steps=2, size=SMALL)
    b = host.sample(apply(host, base, equal, method="extra_attention", token_budget=0), steps=2, size=SMALL)
    assert not host.torch.allclose(a, b)


# --------------------------------------------------------------------------- strength shapes

def test_kv_scale_k_and_v_differs_from_v(host, base, vl):
    outs = [host.sample(apply(host, base, vl, method="extra_attention", strength=1.5, kv_scale=k), steps=2,
                        size=SMALL) for k in ("v", "k_and_v")]
    assert not host.torch.allclose(outs[0], outs[1])


def test_concat_log_strength_bias(host, base, vl):
    plain = host.sample(base, steps=2, size=SMALL)
    unbiased = host.sample(apply(host, base, vl, method="concat", strength=1.0), steps=2, size=SMALL)
    biased = host.sample(apply(host, base, vl, method="concat", strength=0.3), steps=2, size=SMALL)
    assert not host.torch.allclose(biased, unbiased) and not host.torch.allclose(biased, plain)
    with pytest.raises(ValueError, match="log-strength"):
        apply(host, base, vl, method="concat", strength=-0.5)


# --------------------------------------------------------------------------- steering inside blocks

def test_steer_caption_adds_the_embedded_direction_relative_to_the_token_rms(host, base, direction):
    torch = host.torch
    obs_plain, obs = host.DoubleBlockObserver(), host.DoubleBlockObserver()
    plain = base.clone()
    plain.set_model_patch(obs_plain, "double_block")
    one_step(host, plain)
    m = apply(host, base, None, method="steer_caption", strength=0.5, block_weights="0", direction=direction)
    m.set_model_patch(obs, "double_block")  # after ours: sees the steered caption
    one_step(host, m)
    txt0, txt = obs_plain.calls[0][0][1], obs.calls[0][0][1]
    dit = base.get_model_object("diffusion_model")
    d = torch.nn.functional.linear(direction.vector * dit.cap_embedder[0].weight, dit.cap_embedder[1].weight)
    rms = txt0.square().mean(-1, keepdim=True).sqrt()
    want = txt0 + 0.5 * rms * d / d.square().mean(-1, keepdim=True).sqrt()
    assert torch.allclose(txt, want, atol=1e-5 * float(want.abs().max()))
    assert bits_equal(obs.calls[0][0][0], obs_plain.calls[0][0][0])  # the image tokens of block 0 untouched


def test_steer_image_acts_on_image_tokens_only_where_masked(host, base, direction):
    torch = host.torch
    obs_plain, obs = host.DoubleBlockObserver(), host.DoubleBlockObserver()
    plain = base.clone()
    plain.set_model_patch(obs_plain, "double_block")
    one_step(host, plain)
    mask = torch.zeros(1, 64, 64)
    mask[:, :32] = 1.0  # top half
    m = apply(host, base, None, method="steer_image", strength=0.5, block_weights="0", direction=direction, mask=mask)
    m.set_model_patch(obs, "double_block")
    one_step(host, m)
    img0, img = obs_plain.calls[0][0][0], obs.calls[0][0][0]
    half = (SMALL // 2) ** 2 // 2
    assert bits_equal(img[:, half:], img0[:, half:]) and not torch.allclose(img[:, :half], img0[:, :half])
    assert bits_equal(obs.calls[0][0][1], obs_plain.calls[0][0][1])  # caption untouched


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(method="reference_attention"), "needs a reference"),
    (dict(method="reference_attention", reference={"samples": "x"}), "must be a LATENT"),
    (dict(method="extra_attention", vl=None), "needs vl_embeds"),
    (dict(method="caption_stream", mask="ones"), "mask is connected but method caption_stream"),
    (dict(method="concat", negative="vl"), "negative_vl_embeds is connected but method concat"),
    (dict(method="extra_attention", reference="ref"), "reference is connected but method extra_attention"),
    (dict(method="steer_image", vl=None), "needs a direction"),
    (dict(method="steer_image"), "vl_embeds is connected but method steer_image"),
    (dict(method="extra_attention", direction="dir"), "direction is connected"),
    (dict(method="extra_attention", mask="wide"), r"mask values must be in \[0, 1\]"),
    (dict(method="extra_attention", mask="nan"), "NaN/Inf"),
    (dict(method="extra_attention", share="joint", strength=-1.0), "share=joint"),
])
def test_bad_inputs_are_refused_with_the_fix(host, base, vl, ref_latent, direction, kwargs, match):
    torch = host.torch
    kw = dict(kwargs)
    v = kw.pop("vl", vl)
    swaps = {"ones": torch.ones(1, 8, 8), "wide": torch.full((1, 8, 8), 2.0), "nan": torch.full((1, 8, 8), float("nan")),
             "vl": vl, "ref": ref_latent, "dir": direction}
    for name in ("mask", "negative", "reference", "direction"):
        if isinstance(kw.get(name), str) and kw[name] in swaps:
            kw[name] = swaps[kw[name]]
    if "negative" in kw:
        kw["negative_vl_embeds"] = kw.pop("negative")
    with pytest.raises(ValueError, match=match):
        apply(host, base, v, **kw)


def test_a_four_channel_latent_is_refused(host, base):
    sd = {"samples": host.torch.zeros(1, 4, 16, 16)}
    with pytest.raises(ValueError, match="4 channels, Z-Image's DiT takes 16"):
        apply(host, base, None, method="reference_attention", reference=sd)
    with pytest.raises(ValueError, match="holds 2 latents"):
        apply(host, base, None, method="reference_attention", reference={"samples": host.torch.zeros(2, 16, 8, 8)})


# --------------------------------------------------------------------------- chaining the new methods

def test_new_methods_chain_both_act_and_commute_on_disjoint_blocks(host, base, vl, ref_latent, direction):
    torch = host.torch
    first = dict(method="reference_attention", reference=ref_latent, block_weights="0-1", strength=0.8)
    second = dict(method="steer_image", direction=direction, block_weights="2-3", strength=0.4)
    a = apply(host, base, None, node_id="a", **first)
    b = apply(host, base, None, node_id="b", **second)
    ab = apply(host, a, None, node_id="b", **second)
    ba = apply(host, b, None, node_id="a", **first)
    out = {k: host.sample(m, steps=2, size=SMALL) for k, m in (("a", a), ("b", b), ("ab", ab), ("ba", ba))}
    assert not torch.allclose(out["ab"], out["a"]) and not torch.allclose(out["ab"], out["b"])
    assert torch.allclose(out["ab"], out["ba"], atol=1e-5 * float(out["ab"].abs().max()))


@pytest.mark.parametrize("order", ["attention_first", "concat_first"])
def test_a_biased_concat_chained_with_extra_attention_keeps_both(host, base, vl, order):
    """concat's log-strength bias is handed down the override chain: an attention injection on either side of it
    still acts (its own extra attention runs over its own keys, unbiased)."""
    torch = host.torch
    other = host.make_vl(tokens=24, seed=41)
    attn = dict(method="extra_attention", strength=0.9, token_budget=16)
    cat = dict(method="concat", strength=0.4, token_budget=8)
    steps = [(vl, "a", attn), (other, "c", cat)]
    if order == "concat_first":
        steps.reverse()
    model = base
    for v, key, kw in steps:
        model = apply(host, model, v, node_id=key, **kw)
    both = host.sample(model, steps=2, size=SMALL)
    alone = {key: host.sample(apply(host, base, v, node_id=key, **kw), steps=2, size=SMALL) for v, key, kw in steps}
    for key, out in alone.items():
        assert not torch.allclose(both, out), key


@pytest.mark.parametrize("mode", ["matched", "clean"])
def test_reference_pass_stops_inside_the_deepest_chosen_block(host, base, ref_latent, mode):
    """The reference runs every block before the deepest chosen one whole, and of that block only up to its
    attention call (its keys/values): its feed-forward and every deeper block run for the generated image alone."""
    dit = base.get_model_object("diffusion_model")
    runs = [0] * len(dit.layers)
    hooks = [layer.feed_forward.register_forward_pre_hook(lambda m, a, j=j: runs.__setitem__(j, runs[j] + 1))
             for j, layer in enumerate(dit.layers)]
    try:
        one_step(host, apply(host, base, None, method="reference_attention", block_weights="0, 1",
                             reference=ref_latent, reference_noise=mode))
    finally:
        for h in hooks:
            h.remove()
    assert runs == [2, 1] + [1] * (len(dit.layers) - 2)
