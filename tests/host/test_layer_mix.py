"""Host tests: weighted VL Encode layers and VL Select Layers in the REAL ComfyUI server on tiny models —
selecting a layer of a multi-layer encode is exactly that layer's encode; a weighted encode and the same
weights selected downstream give one latent; the weights change the result; bad specs fail clearly."""

from __future__ import annotations

import numpy as np

from tests.host.test_research import expect_error, latent, save_latent, tiny
from tools.host_harness import add_node, node_of

ENCODE, BLEND = "ZImageVL_Encode", "ZImageVL_EmbeddingBlend"


def _run(server, layers: str, select: str | None = None):
    """The tiny style-reference graph with VL Encode at `layers`, optionally through VL Select Layers."""
    p = tiny(server, "VL Style Reference")
    encode = node_of(p, ENCODE)
    p[encode]["inputs"]["layers"] = layers
    if select is not None:
        sel = add_node(p, "ZImageVL_SelectLayers", {"vl_embeds": [encode, 0], "layers": select})
        p[node_of(p, BLEND)]["inputs"]["vl_embeds"] = [sel, 0]
    out = save_latent(p)
    return p, latent(server, server.submit(p), out)


def test_select_layers_and_weighted_encodes_through_the_whole_graph(comfy_server):
    _, single = _run(comfy_server, "-3")
    _, selected = _run(comfy_server, "-3,-4", select="-3")
    assert np.array_equal(selected, single)

    _, equal = _run(comfy_server, "-3,-4")
    _, weighted_equal = _run(comfy_server, "-3:1, -4:1")
    assert np.allclose(weighted_equal, equal, atol=1e-5)

    _, weighted = _run(comfy_server, "-3:0.9, -4:0.1")
    _, selected_weighted = _run(comfy_server, "-3,-4", select="-3:9, -4:1")
    assert np.array_equal(selected_weighted, weighted)
    assert not np.allclose(weighted, equal) and np.isfinite(weighted).all()


def test_bad_layer_specs_are_refused_with_the_node_message(comfy_server):
    p = tiny(comfy_server, "VL Style Reference")
    p[node_of(p, ENCODE)]["inputs"]["layers"] = "-3:0.5, -4"
    expect_error(comfy_server, p, "give a weight to every layer or to none")

    p = tiny(comfy_server, "VL Style Reference")
    encode = node_of(p, ENCODE)
    p[encode]["inputs"]["layers"] = "-3,-4"
    sel = add_node(p, "ZImageVL_SelectLayers", {"vl_embeds": [encode, 0], "layers": "-5:1, -3:1"})
    p[node_of(p, BLEND)]["inputs"]["vl_embeds"] = [sel, 0]
    save_latent(p)
    expect_error(comfy_server, p, "are not in vl_embeds, which holds")
