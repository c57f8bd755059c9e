"""Host tests: weighted layer mixes ('-3:0.7, -4:0.3') in the research nodes, in the REAL ComfyUI server on tiny
models — VL Steering Direction and VL Fit Calibration parse `layers` exactly like VL Encode (same meaning, same
refusals), the mix travels with the direction / calibration and is checked where it is used, and VL Combine
References refuses references whose layer weights disagree."""

from __future__ import annotations

import numpy as np

from tests.host.test_research import expect_error, latent, preview_text, save_latent, text_of, tiny
from tools.host_harness import node_of, nodes_of, set_inputs

MIX = "-3:0.7, -4:0.3"


def test_a_weighted_steering_direction_is_a_direction_of_the_mix(comfy_server):
    p = tiny(comfy_server, "VL Steering")
    d = node_of(p, "ZImageVL_SteeringDirection")
    set_inputs(p, "ZImageVL_SteeringDirection", layers=MIX)
    out = save_latent(p)
    report = preview_text(p, d, 1)
    entry = comfy_server.submit(p)
    assert "layers -4 ×0.30 + -3 ×0.70" in text_of(entry, report), text_of(entry, report)
    weighted = latent(comfy_server, entry, out)
    set_inputs(p, "ZImageVL_SteeringDirection", layers="-3,-4")
    equal = latent(comfy_server, comfy_server.submit(p), out)
    assert np.isfinite(weighted).all() and not np.allclose(weighted, equal)


def test_a_weighted_calibration_applies_to_the_same_mix_only(comfy_server):
    p = tiny(comfy_server, "VL Calibration")
    set_inputs(p, "ZImageVL_FitCalibration", layers=MIX)
    set_inputs(p, "ZImageVL_Encode", layers="-4:3, -3:7")          # the same mix, written otherwise
    report = preview_text(p, node_of(p, "ZImageVL_FitCalibration"), 1)
    out = save_latent(p)
    entry = comfy_server.submit(p)
    assert "VL layer(s) -4 ×0.30 + -3 ×0.70 -> text layer" in text_of(entry, report)
    assert np.isfinite(latent(comfy_server, entry, out)).all()

    set_inputs(p, "ZImageVL_Encode", layers="-3,-4")                # same layers, mixed equally
    expect_error(comfy_server, p, "fitted at the layer mix -4 ×0.30 + -3 ×0.70 but vl_embeds mixes -4, -3",
                 "encode with the calibration's layers (and weights)")


def test_bad_layer_specs_are_refused_like_vl_encode(comfy_server):
    for name, class_type in (("VL Steering", "ZImageVL_SteeringDirection"),
                             ("VL Calibration", "ZImageVL_FitCalibration")):
        p = tiny(comfy_server, name)
        set_inputs(p, class_type, layers="-3:0.5, -4")
        expect_error(comfy_server, p, "give a weight to every layer or to none")
        p = tiny(comfy_server, name)
        set_inputs(p, class_type, layers="-3:0")
        expect_error(comfy_server, p, "must be a finite number > 0")


def test_combine_references_refuses_references_mixed_otherwise(comfy_server):
    p = tiny(comfy_server, "VL Multi Reference")
    encodes = sorted(nodes_of(p, "ZImageVL_Encode"), key=int)
    for nid in encodes:
        p[nid]["inputs"]["layers"] = MIX
    out = save_latent(p)
    assert np.isfinite(latent(comfy_server, comfy_server.submit(p), out)).all()   # one mix everywhere: fine

    p[encodes[1]]["inputs"]["layers"] = "-3:0.2, -4:0.8"
    expect_error(comfy_server, p, "reference #2 mixes its layers as -4 ×0.80 + -3 ×0.20 but reference #1 as "
                                  "-4 ×0.30 + -3 ×0.70", "the same layer weights")
