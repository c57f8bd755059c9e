"""What the editor shows of the pack, checked against the REAL host: subgraph blueprints served by the host's
blueprint endpoint (/global_subgraphs) with inner node types that exist, template thumbnails reachable next to
the templates, readable template titles (frontend 1.47 shows a custom template's file name as its title and
description), every model's download source in the UI workflows, group titles clear of nodes."""
from __future__ import annotations

import io
import json
from urllib.parse import quote

import pytest

from tools.editor_assets import template_title_problems
from tools.host_harness import PACK_LINK_NAME, REPO_ROOT, load_ui_workflow, ui_workflow_names

BLUEPRINTS = {  # name -> the node types it must contain (issue 13.4)
    "VL Style Reference": {"LoadImage", "ZImageVL_Encode", "ZImageVL_EmbeddingBlend"},
    "VL Reference Injection": {"ZImageVL_Encode", "ZImageVL_DiTInjection"},
}
LOADERS = {"UNETLoader", "CLIPLoader", "VAELoader"}
NODE_TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar lies above its pos


def pack_blueprints(server) -> dict:
    listing = server.get_json("/global_subgraphs")
    return {v["name"]: k for k, v in listing.items() if v["info"]["node_pack"] == f"custom_nodes.{PACK_LINK_NAME}"}


def test_blueprint_endpoint_lists_the_packs_subgraphs(comfy_server):
    assert set(pack_blueprints(comfy_server)) == set(BLUEPRINTS)


@pytest.mark.parametrize("name", sorted(BLUEPRINTS))
def test_blueprint_is_one_subgraph_node_whose_inner_nodes_exist(comfy_server, name):
    entry = comfy_server.get_json(f"/global_subgraphs/{pack_blueprints(comfy_server)[name]}")
    bp = json.loads(entry["data"])
    (outer,) = bp["nodes"]
    (sub,) = bp["definitions"]["subgraphs"]
    assert outer["type"] == sub["id"] and sub["name"] == name
    types = {n["type"] for n in sub["nodes"]}
    assert BLUEPRINTS[name] <= types, types
    missing = types - set(comfy_server.object_info())
    assert not missing, f"{name}: inner node types unknown to the host: {missing}"
    ids = {n["id"] for n in sub["nodes"]} | {sub["inputNode"]["id"], sub["outputNode"]["id"]}
    for link in sub["links"]:
        assert link["origin_id"] in ids and link["target_id"] in ids, link
    # the blueprint is usable as one node: it takes inputs and gives an output
    assert sub["inputs"] and sub["outputs"]
    assert [o["type"] for o in sub["outputs"]] == [o["type"] for o in outer["outputs"]]
    assert bp["extra"]["BlueprintDescription"] and bp["extra"]["BlueprintSearchAliases"]


def test_every_template_has_a_thumbnail_served_next_to_it(comfy_server):
    from PIL import Image

    listed = set(comfy_server.get_json("/workflow_templates")[PACK_LINK_NAME])
    assert set(ui_workflow_names()) <= listed
    for name in ui_workflow_names():
        # frontend 1.47: custom-node thumbnails are /api/workflow_templates/<pack>/<name>.jpg, the name put into the
        # URL as it is (the browser percent-encodes its spaces)
        body = comfy_server.get_bytes(f"/api/workflow_templates/{PACK_LINK_NAME}/{quote(name)}.jpg")
        with Image.open(io.BytesIO(body)) as im:
            assert im.format == "JPEG" and im.size[0] == im.size[1] >= 256, (name, im.format, im.size)
            low, high = im.convert("L").getextrema()
            assert high - low > 64, f"{name}.jpg is a blank picture"


def test_the_title_rule_refuses_file_names_that_show_raw():
    assert template_title_problems("VL Style Reference") == []
    for raw in ("zimage_vl_style_reference", "VL style reference", "VL Z-Image Reference", "VL Reference.app",
                "Style Reference", "VL  Style Reference", "VL Reference #2", "VL " + "Long " * 8):
        assert template_title_problems(raw), raw


def test_the_host_lists_every_template_under_a_readable_title(comfy_server):
    """The names /workflow_templates lists are what the template browser shows as title and description."""
    listed = comfy_server.get_json("/workflow_templates")[PACK_LINK_NAME]
    assert sorted(listed) == ui_workflow_names()  # the api/ twins are not listed, no stray file is
    problems = {name: template_title_problems(name) for name in listed}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}
    for name in listed:  # the card loads the workflow from the same unencoded name
        body = comfy_server.get_bytes(f"/api/workflow_templates/{PACK_LINK_NAME}/{quote(name)}.json")
        assert json.loads(body)["nodes"], name


@pytest.mark.parametrize("name", ui_workflow_names())
def test_every_model_loader_names_its_download_source(name):
    for node in load_ui_workflow(name)["nodes"]:
        if node["type"] not in LOADERS:
            continue
        file = node["widgets_values"][0]
        models = {m["name"]: m for m in node.get("properties", {}).get("models", [])}
        assert file in models, f"{name}: node {node['id']} ({node.get('title')}) has no model source for {file}"
        url = models[file]["url"]
        # what the frontend's missing-model dialog accepts for a Download button
        assert url.startswith("https://huggingface.co/") and "/resolve/" in url and url.endswith(".safetensors")
        assert models[file]["directory"] in {"diffusion_models", "text_encoders", "vae"}


def _rect(node):
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - NODE_TITLE_H, x + w, y + h


@pytest.mark.parametrize("name", ui_workflow_names())
def test_group_titles_are_not_hidden_under_nodes(name):
    wf = load_ui_workflow(name)
    for group in wf["groups"]:
        gx, gy, gw, _ = group["bounding"]
        band = (gx, gy, gx + gw, gy + group.get("font_size", 24) * 1.4)  # LGraphGroup title height
        for node in wf["nodes"]:
            x0, y0, x1, y1 = _rect(node)
            overlap = x0 < band[2] and band[0] < x1 and y0 < band[3] and band[1] < y1
            assert not overlap, f"{name}: group '{group['title']}' title is under node {node['id']} ({node.get('title')})"
