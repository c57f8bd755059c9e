"""Metric nodes in the REAL ComfyUI server: numbers in /history (what the editor and the sweep read), the
annotated preview, and the CLIP path on tiny CLIP vision / text models built from ComfyUI's own classes."""
from __future__ import annotations

import math

import pytest

from tools.host_harness import add_node


def _metrics(entry: dict, node_id: str) -> dict:
    out = entry["outputs"][node_id]
    assert out.get("images"), f"node {node_id} showed no annotated preview: {out}"
    assert out.get("text") and out["text"][0].strip(), out
    (values,) = out["metrics"]
    return values


@pytest.fixture(scope="module")
def pictures(comfy_server):
    """A prompt skeleton: the reference image and its colour inverse."""
    p = {}
    img = add_node(p, "LoadImage", {"image": comfy_server.stage_ref_image("test_scene.png", size=128)})
    inv = add_node(p, "ImageInvert", {"image": [img, 0]})
    return p, img, inv


def test_colour_and_artifact_nodes_report_known_answers(comfy_server, pictures):
    base, img, inv = pictures
    p = dict(base)
    same = add_node(p, "ZImageVL_ColourSimilarity", {"image": [img, 0], "reference": [img, 0], "bins": 64})
    other = add_node(p, "ZImageVL_ColourSimilarity", {"image": [inv, 0], "reference": [img, 0], "bins": 64})
    art = add_node(p, "ZImageVL_ArtifactScore", {"image": [img, 0], "period": 16})
    entry = comfy_server.submit(p)
    s, o, a = _metrics(entry, same), _metrics(entry, other), _metrics(entry, art)
    assert s["intersection"] == pytest.approx(1.0, abs=1e-5) and s["emd"] == pytest.approx(1.0, abs=1e-5)
    assert o["intersection"] < 0.9 and o["emd"] < s["emd"]
    assert set(a) == {"artifact_db"} and math.isfinite(a["artifact_db"]) and abs(a["artifact_db"]) < 6.0
    assert "intersection: 1.0000" in entry["outputs"][same]["text"][0]


def test_semantic_node_on_tiny_clip_vision_and_text(comfy_server, pictures):
    base, img, inv = pictures
    p = dict(base)
    vision = add_node(p, "TinyCLIPVision", {"seed": 0, "model_type": "clip_vision_model"})
    text = add_node(p, "TinyCLIPText", {"seed": 0})
    node = add_node(p, "ZImageVL_SemanticSimilarity", {
        "clip_vision": [vision, 0], "image": [img, 0], "reference": [img, 0], "text_only": [inv, 0],
        "clip": [text, 0], "text": "a house under a sun"})
    only_ref = add_node(p, "ZImageVL_SemanticSimilarity", {
        "clip_vision": [vision, 0], "image": [inv, 0], "reference": [img, 0]})
    entry = comfy_server.submit(p)
    full, partial = _metrics(entry, node), _metrics(entry, only_ref)
    assert full["vs_reference"] == pytest.approx(1.0, abs=1e-5)  # the same picture
    assert -1.0 <= full["vs_text_only"] < 0.9999
    assert -1.0 <= full["image_text"] <= 1.0
    assert set(partial) == {"vs_reference"}  # unmeasured values stay out of the report (no NaN in JSON)
    assert partial["vs_reference"] == pytest.approx(full["vs_text_only"], abs=1e-5)  # cos is symmetric


def test_semantic_node_on_siglip_layout_and_its_refusals(comfy_server, pictures):
    base, img, inv = pictures
    p = dict(base)
    siglip = add_node(p, "TinyCLIPVision", {"seed": 1, "model_type": "siglip_vision_model"})
    node = add_node(p, "ZImageVL_SemanticSimilarity", {"clip_vision": [siglip, 0], "image": [img, 0],
                                                       "reference": [inv, 0]})
    values = _metrics(comfy_server.submit(p), node)
    assert -1.0 <= values["vs_reference"] < 0.9999

    text = add_node(p, "TinyCLIPText", {"seed": 0})
    p[node]["inputs"].update(clip=[text, 0], text="a house")
    with pytest.raises(comfy_server.Error) as ei:
        comfy_server.submit(p)
    assert "SigLIP" in ei.value.text and "clip_vision_l" in ei.value.text

    q = dict(base)
    vision = add_node(q, "TinyCLIPVision", {"seed": 0, "model_type": "clip_vision_model"})
    add_node(q, "ZImageVL_SemanticSimilarity", {"clip_vision": [vision, 0], "image": [img, 0]})
    with pytest.raises(comfy_server.Error) as ei:
        comfy_server.submit(q)
    assert "nothing to compare" in ei.value.text


def test_semantic_node_refuses_a_text_model_of_another_space(comfy_server, pictures):
    base, img, _ = pictures
    p = dict(base)
    vision = add_node(p, "TinyCLIPVision", {"seed": 0, "model_type": "clip_vision_model"})
    qwen = add_node(p, "TinyZImageTextEncoder", {"seed": 0, "hidden_size": 256})
    add_node(p, "ZImageVL_SemanticSimilarity", {"clip_vision": [vision, 0], "image": [img, 0],
                                               "clip": [qwen, 0], "text": "a house"})
    with pytest.raises(comfy_server.Error) as ei:
        comfy_server.submit(p)
    assert "clip_vision_l" in ei.value.text or "CLIP text model" in ei.value.text, ei.value.text
