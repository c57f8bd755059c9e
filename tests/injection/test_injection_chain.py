"""Several DiT Layer Injections on one model (tiny Z-Image, ComfyUI's classes, the real sampler): they compose in
the order applied, each under its own key; the same node re-applied replaces only itself; nothing injected →
bit-identical to the plain model, also when chained."""
from __future__ import annotations

import types

import pytest

from tests.injection.test_injection import METHODS, SMALL, bits_equal

A = dict(method="extra_attention", strength=0.8, block_weights="1", token_budget=16)
B = dict(method="caption_stream", strength=0.6, block_weights="2")


@pytest.fixture(scope="module")
def vl2(host):
    return host.make_vl(tokens=24, seed=9)


def chain(host, model, *steps):
    """Apply (vl, node id, settings) injections in order, each under its own key."""
    for vl, node_id, settings in steps:
        model = host.injection.apply_injection(model, vl, node_id=node_id, **settings)
    return model


def node_as(host, unique_id):
    """DiTInjection as ComfyUI runs it in a graph: a class whose hidden inputs carry the node's id."""
    node = host.injection.DiTInjection
    return type("DiTInjectionInGraph", (node,), {"hidden": types.SimpleNamespace(unique_id=unique_id)})


def run_node(node, model, vl, **settings):
    args = dict(method="extra_attention", strength=0.5, block_weights="all", caption_mode="lerp", start_percent=0.0,
                end_percent=1.0, schedule="constant", apply_to="cond_only", token_budget=256, vl_rope="none")
    args.update(settings)
    return node.execute(model=model, vl_embeds=vl, **args).result[0]


def our_keys(host, model):
    pe = host.comfy.patcher_extension
    return [k for k in model.wrappers.get(pe.WrappersMP.APPLY_MODEL, {}) if k.startswith(host.injection.PATCH_KEY)]


@pytest.mark.parametrize("first, second", [(A, B), (A, dict(A, block_weights="2", strength=-0.5)),
                                           (dict(method="concat", token_budget=8), B),
                                           (B, dict(method="concat", token_budget=8))])
def test_two_chained_injections_both_act(host, base, vl, vl2, first, second):
    both = host.sample(chain(host, base, (vl, "a", first), (vl2, "b", second)), steps=2, size=SMALL, cfg=2.0)
    only_a = host.sample(chain(host, base, (vl, "a", first)), steps=2, size=SMALL, cfg=2.0)
    only_b = host.sample(chain(host, base, (vl2, "b", second)), steps=2, size=SMALL, cfg=2.0)
    assert host.torch.isfinite(both).all()
    assert not bits_equal(both, only_a) and not bits_equal(both, only_b) and not bits_equal(only_a, only_b)


@pytest.mark.parametrize("second", [B, dict(A, block_weights="3", strength=0.4), dict(B, method="caption_stream",
                                                                                       block_weights="0")])
def test_two_injections_on_disjoint_blocks_commute(host, base, vl, vl2, second):
    torch = host.torch
    ab = host.sample(chain(host, base, (vl, "a", A), (vl2, "b", second)), steps=3, size=SMALL, cfg=2.0)
    ba = host.sample(chain(host, base, (vl2, "b", second), (vl, "a", A)), steps=3, size=SMALL, cfg=2.0)
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-5)


def test_each_node_application_has_its_own_key_and_replaces_only_itself(host, base, vl, vl2):
    five, six = node_as(host, "5"), node_as(host, "6")
    m5 = run_node(five, base, vl, block_weights="1")
    m56 = run_node(six, m5, vl2, method="caption_stream", block_weights="2")
    assert our_keys(host, m56) == ["zimage_vl_dit_injection:5", "zimage_vl_dit_injection:6"]
    again = run_node(five, m56, vl, block_weights="1")  # the same node re-applied: replaces itself, no stacking
    assert sorted(our_keys(host, again)) == sorted(our_keys(host, m56))
    tagged = [p for ps in again.model_options["transformer_options"]["patches"].values() for p in ps
              if getattr(p, "zimage_vl_key", None)]
    assert sorted(p.zimage_vl_key for p in tagged) == ["zimage_vl_dit_injection:5", "zimage_vl_dit_injection:6"]
    torch = host.torch
    torch.testing.assert_close(host.sample(again, steps=2, size=SMALL), host.sample(m56, steps=2, size=SMALL),
                               rtol=1e-5, atol=1e-5)
    twice = run_node(five, m5, vl, block_weights="1")
    assert our_keys(host, twice) == ["zimage_vl_dit_injection:5"]
    assert bits_equal(host.sample(twice, steps=2, size=SMALL), host.sample(m5, steps=2, size=SMALL))
    # outside a graph (no node id) the node keeps the single fixed key of earlier versions
    assert our_keys(host, run_node(host.injection.DiTInjection, base, vl)) == [host.injection.PATCH_KEY]


@pytest.mark.parametrize("method", METHODS)
def test_a_window_that_never_opens_is_bit_identical_alone_and_chained(host, base, vl, vl2, method):
    """Custom sigmas 1.0, 0.6, 0.3 all lie above percent_to_sigma(0.95): the window [0.95, 1] never opens."""
    sigmas = [1.0, 0.6, 0.3, 0.0]
    plain = host.sample(base, sigmas=sigmas, size=SMALL, cfg=2.0)
    closed = dict(method=method, strength=0.9, block_weights="all", start_percent=0.95, token_budget=8)
    alone = chain(host, base, (vl, "a", closed))
    assert bits_equal(host.sample(alone, sigmas=sigmas, size=SMALL, cfg=2.0), plain)
    for other in METHODS:
        chained = chain(host, base, (vl, "a", closed), (vl2, "b", dict(closed, method=other)))
        assert bits_equal(host.sample(chained, sigmas=sigmas, size=SMALL, cfg=2.0), plain), (method, other)


@pytest.mark.parametrize("method", ["caption_stream", "extra_attention"])
def test_zero_scale_hooks_are_bit_identical_when_chained(host, base, vl, vl2, method):
    plain = host.sample(base, steps=2, size=SMALL, cfg=2.0)
    model = base.clone()
    for key, v in (("a", vl), ("b", vl2)):
        inj = host.injection.build_injection(base, v, node_id=key, method=method, strength=1.0, block_weights="all")
        inj.block_scale = [0.0] * len(inj.block_scale)
        host.injection.install_injection(model, inj)
    assert len(our_keys(host, model)) == 2
    assert bits_equal(host.sample(model, steps=2, size=SMALL, cfg=2.0), plain)


def test_a_concat_split_keeps_an_outer_injection_off_the_negative_rows(host, base, vl, vl2):
    """concat cond_only runs the negative rows as their own call; an outer cond_only injection must not act there:
    the negative half is the one of concat alone, bit for bit."""
    plain = base.clone()
    rec = host.CallRecorder()
    plain.set_model_unet_function_wrapper(rec)
    concat = dict(method="concat", token_budget=8)
    host.sample(chain(host, plain, (vl, "a", B), (vl2, "b", concat)), steps=2, size=SMALL, cfg=3.0)
    chained = [rec.chunks(c, "out") for c in rec.calls]
    rec.calls.clear()
    host.sample(chain(host, plain, (vl2, "b", concat)), steps=2, size=SMALL, cfg=3.0)
    alone = [rec.chunks(c, "out") for c in rec.calls]
    assert len(chained) == len(alone) == 2
    c, a = chained[0], alone[0]  # the first call has the same input (later ones follow the changed positive)
    assert not bits_equal(c[0], a[0])  # the positive half has both
    assert bits_equal(c[1], a[1])  # the negative half has neither
