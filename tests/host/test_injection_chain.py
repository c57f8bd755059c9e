"""DiT Layer Injection in the REAL ComfyUI server (tiny models): chained nodes compose, each under its own node
id; a window that never opens stays bit-identical when chained; the refusals of issue 8 are node errors."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from tests.host.test_injection import _bypass_injection, _run_latent, tiny_injection_prompt
from tools.host_harness import add_node, nodes_of, prune_to

FIRST = dict(method="extra_attention", strength=0.8, block_weights="0", token_budget=32)
SECOND = dict(method="caption_stream", strength=0.6, block_weights="0")
THIRD = dict(method="extra_attention", strength=0.7, block_weights="1", token_budget=16)


def chained(server, first: dict, *more: dict):
    """The shipped workflow with its injection node set to `first` and one more node per entry of `more`
    between it and the KSampler (same VL embeddings)."""
    p, ids = tiny_injection_prompt(server, **first)
    upstream = ids["inject"]
    for settings in more:
        node = copy.deepcopy(p[ids["inject"]])
        node["inputs"].update(settings, model=[upstream, 0])
        upstream = add_node(p, "ZImageVL_DiTInjection", node["inputs"])
    p[ids["sampler"]]["inputs"]["model"] = [upstream, 0]
    return p, ids


def test_two_chained_nodes_both_act(comfy_server):
    s = comfy_server
    both = _run_latent(s, *chained(s, FIRST, SECOND))
    only_first = _run_latent(s, *chained(s, FIRST))
    only_second = _run_latent(s, *chained(s, SECOND))
    assert np.isfinite(both).all()
    assert not np.array_equal(both, only_first) and not np.array_equal(both, only_second)


def test_two_chained_nodes_on_disjoint_blocks_commute(comfy_server):
    s = comfy_server
    ab = _run_latent(s, *chained(s, FIRST, THIRD))
    ba = _run_latent(s, *chained(s, THIRD, FIRST))
    np.testing.assert_allclose(ab, ba, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["extra_attention", "caption_stream", "concat"])
def test_chained_windows_that_never_open_are_bit_identical(comfy_server, method):
    """4 simple steps are at 0, 25, 50, 75 %: windows starting at 90 % never open, in both nodes."""
    s = comfy_server
    p, ids = tiny_injection_prompt(s)
    plain = _run_latent(s, _bypass_injection(p, ids), ids)
    late = dict(method=method, strength=0.8, block_weights="0", token_budget=32, start_percent=0.9)
    p2, ids2 = chained(s, late, dict(late, method="extra_attention"), dict(late, method="concat"))
    assert len(nodes_of(p2, "ZImageVL_DiTInjection")) == 3
    assert np.array_equal(_run_latent(s, p2, ids2), plain)


def _node_error(server, p, ids):
    with pytest.raises(server.Error) as ei:
        server.submit(prune_to(p, [ids["latent"]]))
    assert ei.value.node_type == "ZImageVL_DiTInjection", ei.value.text
    return ei.value.text


@pytest.mark.parametrize("settings, words", [
    (dict(strength=4.0, block_weights="all:1e308"), ("strength", "block_weights", "at most")),
    (dict(strength=0.5, block_weights="0:1e308"), ("strength", "block_weights", "at most")),
    (dict(method="caption_stream", block_weights="1"), ("block_weights", "last block", "caption")),
])
def test_unbounded_scales_and_a_last_block_caption_weight_are_refused(comfy_server, settings, words):
    text = _node_error(comfy_server, *tiny_injection_prompt(comfy_server, **settings))
    assert all(w in text for w in words), text


def test_a_lumina2_model_is_refused(comfy_server):
    p, ids = tiny_injection_prompt(comfy_server)
    (loader,) = nodes_of(p, "TinyZImageModel")
    p[loader]["class_type"] = "TinyLumina2Model"
    text = _node_error(comfy_server, p, ids)
    assert "Z-Image" in text and "Lumina2" in text, text
