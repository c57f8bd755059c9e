"""Host tests against the REAL ComfyUI server (see conftest.py): node schema, shipped workflows run
end-to-end on tiny models built from ComfyUI's own classes, exactness of alpha 0, error texts."""

from __future__ import annotations

import copy
import json
import shutil
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest

from tools.host_harness import (
    add_node,
    api_workflow_names,
    load_api_workflow,
    load_ui_workflow,
    node_of,
    nodes_of,
    prune_to,
    set_image,
    set_inputs,
    swap_loaders_for_tiny,
    ui_workflow_names,
    TINY_HF_FOLDER,
)

STYLE = "VL Style Reference"
IMG2IMG = "VL Reference Img2Img"
SEED = 1234
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# combos whose choices are the host's files: the shipped names need not exist on the test host
FILE_COMBOS = {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"),
               ("LoadImage", "image"), ("ZImageVL_LoadQwen3VL", "folder"), ("ZImageVL_LoadEmbeds", "name")}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# node id -> {input name: (required?, check)} as the brief specifies them
PACK_NODES = {
    "ZImageVL_LoadQwen3VL": {
        "inputs": {"folder": None, "dtype": {"options": ["auto", "bf16", "fp16", "fp32"]}},
        "outputs": ["QWEN3VL_MODEL"],
    },
    "ZImageVL_Encode": {
        "inputs": {"image": None, "prompt": None, "clip": None, "vl_model": None,
                   "layers": {"default": "-6"},
                   "token_mode": {"options": ["full", "image", "text"]},
                   "placement": {"options": ["after_image", "before_image"]},
                   "max_image_tokens": {"default": 1024},
                   "resize": {"options": ["fit_budget", "none"]},
                   "outlier_threshold": {"default": 10.0},
                   "outlier_mode": {"options": ["none", "zero", "clamp", "scale"]}},
        "optional": {"clip", "vl_model"},
        "outputs": ["VL_EMBEDS"],
    },
    "ZImageVL_DiTInjection": {
        "inputs": {"model": None, "vl_embeds": None,
                   "method": {"options": ["extra_attention", "caption_stream", "concat", "reference_attention",
                                          "steer_caption", "steer_image"]},
                   "strength": {"default": 0.5}, "block_weights": {"default": "all"},
                   "caption_mode": {"options": ["lerp", "add"]},
                   "start_percent": {"default": 0.0}, "end_percent": {"default": 1.0},
                   "schedule": {"options": ["constant", "linear_up", "linear_down", "cosine"]},
                   "apply_to": {"options": ["cond_only", "both"]}, "token_budget": {"default": 256},
                   "vl_rope": {"default": "none", "options": ["none", "caption"]},
                   "negative_weight": {"default": 1.0}, "kv_scale": {"default": "v", "options": ["v", "k_and_v"]},
                   "share": {"default": "add", "options": ["add", "joint"]},
                   "reference_noise": {"default": "matched", "options": ["matched", "clean"]},
                   "reference_adain": {"default": False}, "reference_seed": {"default": 0},
                   "negative_vl_embeds": None, "reference": None, "reference_image": None, "vae": None,
                   "mask": None, "direction": None},
        "optional": {"vl_embeds", "negative_vl_embeds", "reference", "reference_image", "vae", "mask", "direction"},
        "outputs": ["MODEL"],
    },
    "ZImageVL_EmbeddingBlend": {
        "inputs": {"conditioning": None, "vl_embeds": None, "alpha": {"default": 0.3},
                   "mode": {"options": ["linear", "slerp", "graduated"]},
                   "length": {"options": ["pool", "attention_pool", "truncate", "concat"]},
                   "normalize": {"options": ["none", "global", "per_dim", "hybrid"]},
                   "token_budget": {"default": 0}},
        "outputs": ["CONDITIONING"],
    },
    "ZImageVL_StyleDelta": {
        "inputs": {"conditioning": None, "vl_style": None, "vl_neutral": None, "strength": {"default": 0.3},
                   "normalize": {"default": True},
                   "length": {"options": ["pool", "attention_pool", "truncate"]}},
        "outputs": ["CONDITIONING"],
    },
    "ZImageVL_AdaIN": {
        "inputs": {"conditioning": None, "vl_embeds": None, "mode": {"options": ["per_token", "per_dim"]},
                   "weight": {"default": 0.5}, "length": {"options": ["pool", "attention_pool", "truncate"]}},
        "outputs": ["CONDITIONING"],
    },
    "ZImageVL_SaveEmbeds": {
        "inputs": {"vl_embeds": None, "filename_prefix": {"default": "vl_embeds/reference"}},
        "output_node": True,
    },
    "ZImageVL_LoadEmbeds": {"inputs": {"name": None}, "outputs": ["VL_EMBEDS"]},
    "ZImageVL_Inspect": {
        "inputs": {"vl_embeds": None, "conditioning": None, "outlier_threshold": {"default": 10.0}},
        "optional": {"conditioning"},
        "outputs": ["IMAGE", "STRING"],
    },
    "ZImageVL_ColourSimilarity": {
        "inputs": {"image": None, "reference": None, "bins": {"default": 64}},
        "outputs": ["FLOAT", "FLOAT", "IMAGE"], "output_node": True,
    },
    "ZImageVL_ArtifactScore": {
        "inputs": {"image": None, "period": {"default": 16}},
        "outputs": ["FLOAT", "IMAGE"], "output_node": True,
    },
    "ZImageVL_SemanticSimilarity": {
        "inputs": {"clip_vision": None, "image": None, "reference": None, "text_only": None, "clip": None,
                   "text": {"default": ""}},
        "optional": {"reference", "text_only", "clip", "text"},
        "outputs": ["FLOAT", "FLOAT", "FLOAT", "IMAGE"], "output_node": True,
    },
    "ZImageVL_SteeringDirection": {
        "inputs": {"positive": None, "negative": None, "prompt": None, "clip": None, "vl_model": None,
                   "layers": {"default": "-6"}, "method": {"options": ["mean_diff", "pca"]},
                   "num_tokens": {"default": 1}, "token_mode": {"options": ["full", "image", "text"]}},
        "optional": {"clip", "vl_model"},
        "outputs": ["VL_DIRECTION", "STRING"],
    },
    "ZImageVL_ApplyDirection": {"inputs": {"conditioning": None, "directions": None, "strengths": None},
                                "outputs": ["CONDITIONING"]},
    "ZImageVL_CombineDirections": {"inputs": {"directions": None, "weights": None, "orthogonalize": None},
                                   "outputs": ["VL_DIRECTION", "STRING"]},
    "ZImageVL_CombineReferences": {
        "inputs": {"references": None, "mode": {"options": ["concat", "average", "norm_average"]}, "weights": None,
                   "negatives": None, "negative_weight": None, "num_tokens": {"default": 0}},
        "outputs": ["VL_EMBEDS"],
    },
    "ZImageVL_GramMatch": {
        "inputs": {"conditioning": None, "vl_embeds": None, "style_weight": None, "content_weight": None,
                   "steps": None, "learning_rate": None, "seed": None},
        "outputs": ["CONDITIONING", "IMAGE", "STRING"],
    },
    "ZImageVL_FitCalibration": {
        "inputs": {"text_clip": None, "clip": None, "vl_model": None, "layers": {"default": "-6"},
                   "kind": {"options": ["affine", "linear"]}, "use_shipped_prompts": {"default": True},
                   "prompts": None, "max_prompts": {"default": 0}},
        "optional": {"clip", "vl_model"},
        "outputs": ["VL_CALIBRATION", "STRING"],
    },
    "ZImageVL_ApplyCalibration": {"inputs": {"vl_embeds": None, "calibration": None, "image_tokens_only": None},
                                  "outputs": ["VL_EMBEDS"]},
    "ZImageVL_SaveDirection": {"inputs": {"direction": None, "filename_prefix": {"default": "vl_directions/direction"}},
                               "outputs": ["STRING"]},
    "ZImageVL_LoadDirection": {"inputs": {"name": None}, "outputs": ["VL_DIRECTION"]},
    "ZImageVL_SaveCalibration": {"inputs": {"calibration": None,
                                            "filename_prefix": {"default": "vl_calibrations/calibration"}},
                                 "outputs": ["STRING"]},
    "ZImageVL_LoadCalibration": {"inputs": {"name": None}, "outputs": ["VL_CALIBRATION"]},
    "ZImageVL_SelectLayers": {"inputs": {"vl_embeds": None, "layers": {"default": "-6"}}, "outputs": ["VL_EMBEDS"]},
}


# --------------------------------------------------------------------------- helpers

def _input_specs(info: dict) -> dict:
    """name -> (section, spec) for the required and optional inputs of an /object_info entry."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            out[name] = (section, spec)
    return out


def _spec_type(spec) -> str:
    t = spec[0]
    return "COMBO" if isinstance(t, list) else t


def _spec_opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _combo_options(spec) -> list:
    if isinstance(spec[0], list):
        return spec[0]
    return _spec_opts(spec).get("options", [])


def _autogrow_socket(specs: dict, name: str):
    """The template spec of socket 'group.prefixK' of a growing (Autogrow) input, or None."""
    group, socket = name.split(".", 1)
    spec = specs.get(group, (None, None))[1]
    if spec is None or spec[0] != "COMFY_AUTOGROW_V3":
        return None
    template = _spec_opts(spec).get("template", {})
    if not socket.startswith(template.get("prefix", "\0")):
        return None
    found = [s for section in template.get("input", {}).values() for s in section.values()]
    return found[0] if found else None


def _ordered_inputs(info: dict) -> list[str]:
    order = info.get("input_order") or {}
    names = list(order.get("required", [])) + list(order.get("optional", []))
    if not names:
        names = list((info["input"].get("required") or {})) + list((info["input"].get("optional") or {}))
    return names


def _pack_node_infos(server) -> dict:
    info = server.object_info()
    missing = [n for n in PACK_NODES if n not in info]
    if missing:
        pytest.fail(f"/object_info lacks the pack nodes {missing} (pack import failed?); "
                    f"server log:\n{server.log_tail(40)}")
    return info


def _read_latent(path: Path):
    from safetensors.numpy import load_file
    data = load_file(str(path))
    assert "latent_tensor" in data, f"{path} holds {list(data)}"
    return data["latent_tensor"]


def _latent_output(server, entry: dict, node_id: str):
    files = server.output_files(entry, node_id, "latents")
    assert len(files) == 1, f"SaveLatent {node_id} reported {entry.get('outputs', {}).get(node_id)}"
    return _read_latent(files[0])


def _image_outputs(server, entry: dict, node_id: str) -> list[Path]:
    files = server.output_files(entry, node_id, "images")
    assert files, f"node {node_id} saved no image: {entry.get('outputs', {}).get(node_id)}"
    for f in files:
        assert f.is_file(), f"{f} missing"
    return files


def tiny_style_prompt(server, *, alpha=None, width=256, vl_width=None, vl_backend="native", steps=4,
                      size=128, image="test_scene.png", save_latent=True) -> tuple[dict, dict]:
    """The shipped style-reference API workflow on tiny models, 128², 4 steps, fixed seed.

    Returns (prompt, ids) with ids for the interesting nodes (+ "save_latent" when added).
    """
    p = swap_loaders_for_tiny(load_api_workflow(STYLE), seed=0, width=width, vl_width=vl_width, vl_backend=vl_backend)
    set_image(p, server.stage_ref_image(image, size=size))
    set_inputs(p, "EmptySD3LatentImage", width=size, height=size, batch_size=1)
    set_inputs(p, "KSampler", seed=SEED, steps=steps)
    if alpha is not None:
        set_inputs(p, "ZImageVL_EmbeddingBlend", alpha=alpha)
    ids = {"sampler": node_of(p, "KSampler"), "blend": node_of(p, "ZImageVL_EmbeddingBlend"),
           "encode": node_of(p, "ZImageVL_Encode"), "text": node_of(p, "CLIPTextEncode"),
           "save": node_of(p, "SaveImage"), "inspect": node_of(p, "ZImageVL_Inspect")}
    if save_latent:
        ids["save_latent"] = add_node(p, "SaveLatent", {"samples": [ids["sampler"], 0], "filename_prefix": "latents/tiny"})
    return p, ids


def _expect_error(server, prompt: dict):
    with pytest.raises(server.Error) as ei:
        server.submit(prompt)
    print("\nnode error as the server sent it:", ei.value.text)
    return ei.value


def _vl_only_prompt(server, *, image_node_extra=None, clip_class="TinyQwen3VLClip", clip_inputs=None,
                    prompt_text="a picture", consumer="inspect") -> tuple[dict, str]:
    """LoadImage -> [transform] -> VL Encode (tiny clip) -> VL Inspect -> PreviewImage."""
    p = {}
    img = add_node(p, "LoadImage", {"image": server.stage_ref_image("test_scene.png", size=128)})
    image_ref = [img, 0]
    if image_node_extra is not None:
        class_type, extra = image_node_extra
        inputs = {k: (v if v != "@image" else [img, 0]) for k, v in extra.items()}
        inputs = {k: ([img, 1] if v == "@mask" else v) for k, v in inputs.items()}
        image_ref = [add_node(p, class_type, inputs), 0]
    clip = add_node(p, clip_class, clip_inputs or {"seed": 0, "hidden_size": 256})
    enc = add_node(p, "ZImageVL_Encode", {
        "image": image_ref, "clip": [clip, 0], "prompt": prompt_text, "layers": "-3", "token_mode": "full",
        "placement": "after_image", "max_image_tokens": 64, "resize": "fit_budget", "outlier_threshold": 10.0,
        "outlier_mode": "none"})
    ins = add_node(p, "ZImageVL_Inspect", {"vl_embeds": [enc, 0], "outlier_threshold": 10.0})
    add_node(p, "PreviewImage", {"images": [ins, 0]})
    return p, enc


# --------------------------------------------------------------------------- workflow files (no host needed)

def test_every_ui_workflow_has_an_api_twin_with_the_same_nodes():
    ui_names, api_names = ui_workflow_names(), api_workflow_names()
    assert {STYLE, IMG2IMG} <= set(ui_names), ui_names
    assert ui_names == api_names, f"UI {ui_names} vs API {api_names}"
    for name in ui_names:
        ui, api = load_ui_workflow(name), load_api_workflow(name)
        ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
        assert Counter(n["type"] for n in ui_nodes.values()) == Counter(n["class_type"] for n in api.values()), name
        assert set(ui_nodes) == set(api), f"{name}: node ids differ between UI and API"
        for nid, n in ui_nodes.items():
            assert n["type"] == api[nid]["class_type"], (name, nid)
            for key in ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode"):
                assert key in n, f"{name}: UI node {nid} lacks {key!r}"
        # links: every link is referenced by both its ends, and mirrors an API input link
        links = {l[0]: l for l in ui["links"]}
        assert ui["last_link_id"] >= max(links, default=0) and ui["last_node_id"] >= max(int(k) for k in ui_nodes)
        api_links = set()
        for nid, n in api.items():
            for inp, v in n["inputs"].items():
                if isinstance(v, list):
                    api_links.add((v[0], v[1], nid, inp))
        ui_links = set()
        nodes_by_id = {n["id"]: n for n in ui["nodes"]}
        for lid, origin, oslot, target, tslot, ltype in ui["links"]:
            src, dst = nodes_by_id[origin], nodes_by_id[target]
            assert lid in src["outputs"][oslot]["links"], f"{name}: link {lid} missing on its origin"
            assert dst["inputs"][tslot]["link"] == lid, f"{name}: link {lid} missing on its target"
            assert src["outputs"][oslot]["type"] == ltype == dst["inputs"][tslot]["type"], f"{name}: link {lid} type"
            ui_links.add((str(origin), oslot, str(target), dst["inputs"][tslot]["name"]))
        assert ui_links == api_links, f"{name}: UI links {ui_links ^ api_links} differ from the API twin"
        notes = [n for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
        assert notes and all(len(n["widgets_values"][0]) > 200 for n in notes), f"{name}: needs a Note explaining settings"


def test_shipped_workflows_match_the_brief():
    for name in (STYLE, IMG2IMG):
        api = load_api_workflow(name)
        unet = api[node_of(api, "UNETLoader")]["inputs"]
        assert unet["unet_name"] == "z_image_turbo_bf16.safetensors"
        clips = {api[i]["inputs"]["clip_name"]: api[i]["inputs"]["type"] for i in nodes_of(api, "CLIPLoader")}
        assert clips.get("qwen_3_4b.safetensors") == "lumina2", clips
        assert "qwen3vl_4b.safetensors" in clips, clips
        assert clips["qwen3vl_4b.safetensors"] not in ("flux", "flux2", "krea2", "mage", "boogu", "ideogram4", "joyimage")
        assert api[node_of(api, "VAELoader")]["inputs"]["vae_name"] == "ae.safetensors"
        assert api[node_of(api, "ModelSamplingAuraFlow")]["inputs"]["shift"] == 3.0
        ks = api[node_of(api, "KSampler")]["inputs"]
        assert ks["steps"] == 8 and ks["cfg"] == 1.0 and ks["scheduler"] == "simple"
        assert ks["sampler_name"] in ("res_multistep", "euler")
        assert api[ks["negative"][0]]["class_type"] == "ConditioningZeroOut"
        assert api[ks["positive"][0]]["class_type"] == "ZImageVL_EmbeddingBlend"
        blend = api[ks["positive"][0]]["inputs"]
        assert (blend["alpha"], blend["length"], blend["normalize"]) == (0.3, "pool", "global")
        assert api[blend["conditioning"][0]]["class_type"] == "CLIPTextEncode"
        enc = api[blend["vl_embeds"][0]]
        assert enc["class_type"] == "ZImageVL_Encode"
        assert api[enc["inputs"]["image"][0]]["class_type"] == "LoadImage"
        assert api[enc["inputs"]["clip"][0]]["inputs"]["clip_name"] == "qwen3vl_4b.safetensors"
        latent = api[ks["latent_image"][0]]
        if name == STYLE:
            assert latent["class_type"] == "EmptySD3LatentImage"
            assert (latent["inputs"]["width"], latent["inputs"]["height"]) == (1024, 1024)
            assert ks["denoise"] == 1.0
        else:
            assert latent["class_type"] == "VAEEncode"
            assert api[latent["inputs"]["pixels"][0]]["class_type"] == "LoadImage"
            assert ks["denoise"] == 0.6
        assert nodes_of(api, "SaveImage") and nodes_of(api, "VAEDecode")
        ins = node_of(api, "ZImageVL_Inspect")
        assert any(api[p]["inputs"]["images"][0] == ins for p in nodes_of(api, "PreviewImage"))


# --------------------------------------------------------------------------- schema

def test_object_info_lists_every_pack_node_with_tooltips(comfy_server):
    info = _pack_node_infos(comfy_server)
    assert {k for k in info if k.startswith("ZImageVL_")} == set(PACK_NODES)
    problems = []
    for node_id, want in PACK_NODES.items():
        entry = info[node_id]
        specs = _input_specs(entry)
        for name, check in want["inputs"].items():
            if name not in specs:
                problems.append(f"{node_id}: input {name!r} missing (has {sorted(specs)})")
                continue
            section, spec = specs[name]
            opts = _spec_opts(spec)
            if not str(opts.get("tooltip", "")).strip():
                problems.append(f"{node_id}.{name}: no tooltip")
            if name in want.get("optional", set()) and section != "optional":
                problems.append(f"{node_id}.{name}: should be optional")
            if check and "default" in check and opts.get("default") != check["default"]:
                problems.append(f"{node_id}.{name}: default {opts.get('default')!r} != {check['default']!r}")
            if check and "options" in check:
                have = _combo_options(spec)
                if not set(check["options"]) <= set(have):
                    problems.append(f"{node_id}.{name}: options {have} lack {set(check['options']) - set(have)}")
        for name, (section, spec) in specs.items():  # inputs beyond the brief need tooltips too
            if not str(_spec_opts(spec).get("tooltip", "")).strip():
                problems.append(f"{node_id}.{name}: no tooltip")
        if "outputs" in want and list(entry["output"])[:len(want["outputs"])] != want["outputs"]:
            problems.append(f"{node_id}: outputs {entry['output']} != {want['outputs']}")
        if want.get("output_node") and not entry.get("output_node"):
            problems.append(f"{node_id}: should be an output node")
        if not entry.get("display_name") or not entry.get("description"):
            problems.append(f"{node_id}: display_name/description missing")
    assert not problems, "\n".join(sorted(set(problems)))


def test_tiny_test_nodes_never_come_from_the_pack(comfy_server):
    info = comfy_server.object_info()
    tiny = {k: v.get("python_module") for k, v in info.items() if k.startswith("Tiny")}
    assert set(tiny) >= {"TinyZImageModel", "TinyZImageTextEncoder", "TinyQwen3VLClip", "TinyVAE"}
    assert set(tiny.values()) == {"custom_nodes.zimage_vl_tiny_nodes"}, tiny
    pack_modules = {v.get("python_module") for k, v in info.items() if k.startswith("ZImageVL_")}
    assert pack_modules == {"custom_nodes.comfyui-zimage-vl"}, pack_modules


def test_workflow_nodes_exist_and_ui_widgets_match_api(comfy_server):
    info = _pack_node_infos(comfy_server)
    problems = []
    for name in ui_workflow_names():
        ui, api = load_ui_workflow(name), load_api_workflow(name)
        for n in ui["nodes"]:
            t = n["type"]
            if t in FRONTEND_ONLY:
                continue
            if t not in info:
                problems.append(f"{name}: node type {t} not in /object_info")
                continue
            entry = info[t]
            specs = _input_specs(entry)
            linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
            linked |= {g.split(".", 1)[0] for g in linked if "." in g}   # a growing (Autogrow) input's group
            for i in n.get("inputs", []):  # sockets: names and types as the host declares them
                spec = _autogrow_socket(specs, i["name"]) if "." in i["name"] else specs.get(i["name"], (None, None))[1]
                if spec is None:
                    problems.append(f"{name}: {t} #{n['id']} has an input {i['name']!r} the node does not declare")
                elif _spec_type(spec) != i["type"] and _spec_type(spec) != "COMBO":
                    problems.append(f"{name}: {t}.{i['name']} socket type {i['type']} != {_spec_type(spec)}")
            for slot, o in enumerate(n.get("outputs", [])):
                if slot >= len(entry["output"]) or entry["output"][slot] != o["type"]:
                    problems.append(f"{name}: {t} #{n['id']} output {slot} type {o['type']} != {entry['output'][slot:slot + 1]}")
            values = list(n.get("widgets_values") or [])
            mapped = {}
            for inp in _ordered_inputs(entry):
                section, spec = specs[inp]
                if _spec_type(spec) not in WIDGET_TYPES or inp in linked:
                    if _spec_type(spec) in WIDGET_TYPES and inp in linked:
                        values.pop(0) if values else None
                    continue
                if not values:
                    if section == "required":
                        problems.append(f"{name}: {t} #{n['id']} has no widget value for {inp}")
                    continue
                mapped[inp] = values.pop(0)
                opts = _spec_opts(spec)
                if opts.get("control_after_generate") or inp in ("seed", "noise_seed"):
                    ctl = values.pop(0) if values else None
                    if ctl not in ("fixed", "increment", "decrement", "randomize"):
                        problems.append(f"{name}: {t}.{inp} control_after_generate value {ctl!r}")
                if opts.get("image_upload"):
                    values.pop(0) if values else None
            if values:
                problems.append(f"{name}: {t} #{n['id']} has {len(values)} extra widget values {values}")
            api_inputs = {k: v for k, v in api[str(n["id"])]["inputs"].items() if not isinstance(v, list)}
            if mapped != api_inputs:
                problems.append(f"{name}: {t} #{n['id']} UI widgets {mapped} != API inputs {api_inputs}")
            for inp, v in mapped.items():
                spec = specs[inp][1]
                if _spec_type(spec) == "COMBO" and (t, inp) not in FILE_COMBOS and v not in _combo_options(spec):
                    problems.append(f"{name}: {t}.{inp}={v!r} not among {_combo_options(spec)}")
                opts = _spec_opts(spec)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    if "min" in opts and v < opts["min"] or "max" in opts and v > opts["max"]:
                        problems.append(f"{name}: {t}.{inp}={v} outside [{opts.get('min')}, {opts.get('max')}]")
            for inp, (section, spec) in specs.items():
                if section == "required" and _spec_type(spec) not in WIDGET_TYPES and inp not in linked:
                    problems.append(f"{name}: {t} #{n['id']} required input {inp} is not linked")
    assert not problems, "\n".join(problems)


def test_workflows_are_served_as_pack_templates(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    listed = set(templates.get("comfyui-zimage-vl", []))
    assert set(ui_workflow_names()) <= listed, templates
    assert not (set(api_workflow_names()) - set(ui_workflow_names())) & listed
    body = comfy_server.get_bytes(f"/api/workflow_templates/comfyui-zimage-vl/{quote(STYLE)}.json")
    assert json.loads(body)["nodes"], "template served without nodes"


# --------------------------------------------------------------------------- shipped workflows, tiny models

TINY_IMAGES = ["test_scene.png", "purple_hexagon.png", "style_pixel_art.png", "style_watercolor_forest.png"]
TINY_SIZE = 64


def tiny_shipped_prompt(server, name: str) -> dict:
    """A shipped API workflow as is, on tiny models: its pictures staged (one per LoadImage), 64² output (and
    ImageScale), 2 steps, few VL tokens, short optimisation / calibration loops; every other input as shipped."""
    p = swap_loaders_for_tiny(load_api_workflow(name), seed=0)
    for k, nid in enumerate(sorted(nodes_of(p, "LoadImage"), key=int)):
        p[nid]["inputs"]["image"] = server.stage_ref_image(TINY_IMAGES[k % len(TINY_IMAGES)], size=TINY_SIZE)
    edits = {"EmptySD3LatentImage": dict(width=TINY_SIZE, height=TINY_SIZE), "ImageScale": dict(width=TINY_SIZE,
             height=TINY_SIZE), "KSampler": dict(seed=SEED, steps=2), "ZImageVL_Encode": dict(max_image_tokens=64),
             "ZImageVL_SteeringDirection": dict(max_image_tokens=64), "ZImageVL_GramMatch": dict(steps=10),
             "ZImageVL_FitCalibration": dict(max_prompts=6)}
    for class_type, values in edits.items():
        if nodes_of(p, class_type):
            set_inputs(p, class_type, **values)
    return p


@pytest.mark.parametrize("name", api_workflow_names())
def test_every_shipped_api_workflow_runs_on_tiny_models(comfy_server, name):
    """Each API workflow, unchanged but for the tiny models and sizes, runs in the real host and saves its
    pictures at the output size."""
    from PIL import Image
    p = tiny_shipped_prompt(comfy_server, name)
    entry = comfy_server.submit(p)
    saves = nodes_of(p, "SaveImage")
    assert saves, f"{name} saves nothing"
    for nid in saves:
        for f in _image_outputs(comfy_server, entry, nid):
            with Image.open(f) as im:
                assert im.size == (TINY_SIZE, TINY_SIZE), (name, nid, im.size)
    for nid in nodes_of(p, "PreviewImage"):
        assert _image_outputs(comfy_server, entry, nid), (name, nid)


def test_style_reference_workflow_runs_on_tiny_models(comfy_server):
    p, ids = tiny_style_prompt(comfy_server)
    entry = comfy_server.submit(p)
    from PIL import Image
    images = _image_outputs(comfy_server, entry, ids["save"])
    with Image.open(images[0]) as im:
        assert im.size == (128, 128)
    plot = _image_outputs(comfy_server, entry, node_of(p, "PreviewImage"))
    with Image.open(plot[0]) as im:
        assert min(im.size) >= 64
    import io
    item = entry["outputs"][ids["save"]]["images"][0]
    with Image.open(io.BytesIO(comfy_server.view(item))) as im:  # served like the editor fetches it
        assert im.size == (128, 128)
    lat = _latent_output(comfy_server, entry, ids["save_latent"])
    assert lat.shape == (1, 16, 16, 16)
    import numpy as np
    assert np.isfinite(lat).all() and float(np.abs(lat).max()) > 0


def test_alpha_zero_is_exactly_text_only_and_alpha_half_changes_it(comfy_server):
    import numpy as np
    results = {}
    for label, alpha in (("alpha0", 0.0), ("alpha05", 0.5)):
        p, ids = tiny_style_prompt(comfy_server, alpha=alpha)
        p = prune_to(p, [ids["save_latent"]])
        results[label] = _latent_output(comfy_server, comfy_server.submit(p), ids["save_latent"])
    # text only: the blend bypassed, KSampler positive straight from CLIPTextEncode
    p, ids = tiny_style_prompt(comfy_server)
    p[ids["sampler"]]["inputs"]["positive"] = [ids["text"], 0]
    p = prune_to(p, [ids["save_latent"]])
    assert not nodes_of(p, "ZImageVL_EmbeddingBlend")
    results["text"] = _latent_output(comfy_server, comfy_server.submit(p), ids["save_latent"])
    assert results["text"].shape == results["alpha0"].shape == (1, 16, 16, 16)
    assert np.array_equal(results["alpha0"], results["text"]), (
        f"alpha 0 differs from text-only: max |diff| {np.abs(results['alpha0'] - results['text']).max()}")
    diff = float(np.abs(results["alpha05"] - results["text"]).max())
    assert diff > 1e-4, f"alpha 0.5 did not change the result (max |diff| {diff})"


def test_img2img_workflow_runs_on_tiny_models(comfy_server):
    p = swap_loaders_for_tiny(load_api_workflow(IMG2IMG), seed=0)
    set_image(p, comfy_server.stage_ref_image("style_watercolor_forest.png", size=128))
    set_inputs(p, "KSampler", seed=SEED, steps=4)
    ks = node_of(p, "KSampler")
    assert p[ks]["inputs"]["denoise"] == 0.6
    entry = comfy_server.submit(p)
    from PIL import Image
    with Image.open(_image_outputs(comfy_server, entry, node_of(p, "SaveImage"))[0]) as im:
        assert im.size == (128, 128)


def test_transformers_loader_path_through_the_server(comfy_server):
    if comfy_server.tiny_hf_error:
        pytest.skip(f"tiny HF Qwen3-VL folder could not be built: {comfy_server.tiny_hf_error}")
    info = _pack_node_infos(comfy_server)
    folder_spec = _input_specs(info["ZImageVL_LoadQwen3VL"])["folder"][1]
    assert TINY_HF_FOLDER in _combo_options(folder_spec), _combo_options(folder_spec)
    p, ids = tiny_style_prompt(comfy_server, vl_backend="transformers", image="purple_hexagon.png")
    loader = node_of(p, "ZImageVL_LoadQwen3VL")
    assert p[ids["encode"]]["inputs"]["vl_model"] == [loader, 0] and "clip" not in p[ids["encode"]]["inputs"]
    entry = comfy_server.submit(p)
    from PIL import Image
    with Image.open(_image_outputs(comfy_server, entry, ids["save"])[0]) as im:
        assert im.size == (128, 128)
    lat = _latent_output(comfy_server, entry, ids["save_latent"])
    assert lat.shape == (1, 16, 16, 16)


# --------------------------------------------------------------------------- bad inputs -> clear node errors

def test_clip_that_is_not_qwen3vl_is_refused(comfy_server):
    p, enc = _vl_only_prompt(comfy_server, clip_class="TinyZImageTextEncoder", clip_inputs={"seed": 0, "hidden_size": 256})
    err = _expect_error(comfy_server, p)
    assert err.node_type == "ZImageVL_Encode", err.text
    low = err.text.lower()
    assert "qwen3-vl" in low or "qwen3vl" in low, err.text


def test_width_mismatch_names_both_widths(comfy_server):
    p, ids = tiny_style_prompt(comfy_server, vl_width=384)
    p = prune_to(p, [ids["save_latent"]])
    err = _expect_error(comfy_server, p)
    assert "384" in err.text and "256" in err.text, err.text
    assert err.node_type in ("ZImageVL_EmbeddingBlend", "ZImageVL_Encode"), err.text


def test_rgba_image_is_refused(comfy_server):
    p, enc = _vl_only_prompt(comfy_server, image_node_extra=("JoinImageWithAlpha", {"image": "@image", "alpha": "@mask"}))
    err = _expect_error(comfy_server, p)
    assert err.node_type == "ZImageVL_Encode", err.text
    assert "alpha" in err.text.lower() or "rgba" in err.text.lower(), err.text


def test_batch_of_two_is_refused(comfy_server):
    p, enc = _vl_only_prompt(comfy_server, image_node_extra=("RepeatImageBatch", {"image": "@image", "amount": 2}))
    err = _expect_error(comfy_server, p)
    assert err.node_type == "ZImageVL_Encode", err.text
    assert "batch" in err.text.lower() and "2" in err.text, err.text


@pytest.mark.parametrize("prompt_text", ["", "   "])
def test_empty_prompt_is_refused(comfy_server, prompt_text):
    p, enc = _vl_only_prompt(comfy_server, prompt_text=prompt_text)
    err = _expect_error(comfy_server, p)
    assert "prompt" in err.text.lower() and "empty" in err.text.lower(), err.text


def test_vl_only_graph_runs(comfy_server):
    """Control for the error tests above: the same graph with good inputs runs and reports."""
    p, enc = _vl_only_prompt(comfy_server)
    entry = comfy_server.submit(p)
    ins = node_of(p, "ZImageVL_Inspect")
    text = entry["outputs"].get(ins, {}).get("text")
    assert text and "".join(map(str, text)).strip(), entry["outputs"]
    # the plot is also the node's own preview, fetched like the editor does
    (preview,) = entry["outputs"][ins]["images"]
    from PIL import Image
    import io as _io

    with Image.open(_io.BytesIO(comfy_server.view(preview))) as im:
        assert im.width > im.height > 100


# --------------------------------------------------------------------------- save / load

def _embeds_dir(server) -> Path:
    return server.models_dir / "vl_embeddings"


def _saved_files(server) -> set[Path]:
    return {p for p in _embeds_dir(server).rglob("*") if p.is_file()}


def test_save_load_round_trip_through_the_server(comfy_server):
    import numpy as np
    # 1. encode once and save
    p, ids = tiny_style_prompt(comfy_server)
    save = add_node(p, "ZImageVL_SaveEmbeds", {"vl_embeds": [ids["encode"], 0], "filename_prefix": "vl_embeds/roundtrip"})
    before = _saved_files(comfy_server)
    p = prune_to(p, [save, ids["save_latent"]])
    entry = comfy_server.submit(p)
    new = sorted(_saved_files(comfy_server) - before)
    assert len(new) == 1 and new[0].suffix == ".safetensors", new
    saved = new[0]
    assert saved.resolve().is_relative_to(_embeds_dir(comfy_server).resolve())
    direct = _latent_output(comfy_server, entry, ids["save_latent"])
    name = saved.relative_to(_embeds_dir(comfy_server)).as_posix()

    # 2. the loader lists it and gives the same result as the direct encode
    info = comfy_server.object_info(refresh=True)
    names = _combo_options(_input_specs(info["ZImageVL_LoadEmbeds"])["name"][1])
    assert name in names, f"{name} not listed by ZImageVL_LoadEmbeds: {names}"
    p, ids = tiny_style_prompt(comfy_server)
    load = add_node(p, "ZImageVL_LoadEmbeds", {"name": name})
    p[ids["blend"]]["inputs"]["vl_embeds"] = [load, 0]
    p = prune_to(p, [ids["save_latent"]])
    assert not nodes_of(p, "ZImageVL_Encode")
    loaded = _latent_output(comfy_server, comfy_server.submit(p), ids["save_latent"])
    assert np.array_equal(loaded, direct), f"save/load changed the result: max |diff| {np.abs(loaded - direct).max()}"

    # 3. a name escaping the folder is refused, even though a valid file sits there
    outside = comfy_server.models_dir / "outside.safetensors"
    shutil.copyfile(saved, outside)
    for bad in ("../outside.safetensors", str(outside), "vl_embeds/../../outside.safetensors"):
        p = {}
        load = add_node(p, "ZImageVL_LoadEmbeds", {"name": bad})
        ins = add_node(p, "ZImageVL_Inspect", {"vl_embeds": [load, 0], "outlier_threshold": 10.0})
        add_node(p, "PreviewImage", {"images": [ins, 0]})
        err = _expect_error(comfy_server, p)
        assert "outside" in err.text or "inside" in err.text, err.text
        assert "ZImageVL_LoadEmbeds" in err.text or err.node_type == "ZImageVL_LoadEmbeds" \
            or any(ne.get("class_type") == "ZImageVL_LoadEmbeds" for ne in err.node_errors.values()), err.text


# --------------------------------------------------------------------------- the other conditioning nodes

@pytest.mark.parametrize("mode,length,normalize,token_budget", [
    ("slerp", "attention_pool", "per_dim", 0),
    ("graduated", "truncate", "hybrid", 0),
    ("linear", "concat", "none", 64),
])
def test_blend_variants_sample(comfy_server, mode, length, normalize, token_budget):
    import numpy as np
    p, ids = tiny_style_prompt(comfy_server, alpha=0.5, steps=2)
    set_inputs(p, "ZImageVL_EmbeddingBlend", mode=mode, length=length, normalize=normalize, token_budget=token_budget)
    p = prune_to(p, [ids["save_latent"]])
    lat = _latent_output(comfy_server, comfy_server.submit(p), ids["save_latent"])
    assert lat.shape == (1, 16, 16, 16) and np.isfinite(lat).all()


def test_style_delta_adain_and_inspect_chain(comfy_server):
    """text -> Style Delta (style vs neutral reference, same prompt) -> AdaIN -> KSampler; Inspect on the result."""
    import numpy as np
    p, ids = tiny_style_prompt(comfy_server, steps=2)
    enc = p[ids["encode"]]
    neutral_img = add_node(p, "LoadImage", {"image": comfy_server.stage_ref_image("purple_hexagon.png", size=128)})
    neutral = add_node(p, "ZImageVL_Encode", {**copy.deepcopy(enc["inputs"]), "image": [neutral_img, 0]})
    delta = add_node(p, "ZImageVL_StyleDelta", {"conditioning": [ids["text"], 0], "vl_style": [ids["encode"], 0],
                                                "vl_neutral": [neutral, 0], "strength": 0.3, "normalize": True,
                                                "length": "pool"})
    adain = add_node(p, "ZImageVL_AdaIN", {"conditioning": [delta, 0], "vl_embeds": [ids["encode"], 0],
                                           "mode": "per_dim", "weight": 0.5, "length": "attention_pool"})
    p[ids["sampler"]]["inputs"]["positive"] = [adain, 0]
    p[ids["inspect"]]["inputs"]["conditioning"] = [adain, 0]
    entry = comfy_server.submit(p)
    lat = _latent_output(comfy_server, entry, ids["save_latent"])
    assert lat.shape == (1, 16, 16, 16) and np.isfinite(lat).all()
    report = entry["outputs"].get(ids["inspect"], {}).get("text")
    assert report and "".join(map(str, report)).strip(), entry["outputs"].get(ids["inspect"])


def _load_into_blend(server, name: str) -> dict:
    p, ids = tiny_style_prompt(server)
    load = add_node(p, "ZImageVL_LoadEmbeds", {"name": name})
    p[ids["blend"]]["inputs"]["vl_embeds"] = [load, 0]
    return prune_to(p, [ids["save_latent"]])


def test_nan_embeddings_and_pickles_are_refused_through_the_server(comfy_server):
    import pickle

    import torch

    from vl_core.types import VLEmbeds

    folder = _embeds_dir(comfy_server)
    folder.mkdir(parents=True, exist_ok=True)
    hidden = torch.randn(1, 24, 256)
    hidden[0, 5, 7] = float("nan")
    VLEmbeds(hidden={6: hidden}, image_spans=((2, 18),), prompt_span=(18, 22), num_layers=8,
             source="nan-test").to_safetensors(str(folder / "nan_test.safetensors"))
    (folder / "pickled.safetensors").write_bytes(pickle.dumps({"hidden": hidden}))
    comfy_server.object_info(refresh=True)

    err = _expect_error(comfy_server, _load_into_blend(comfy_server, "nan_test.safetensors"))
    assert "NaN" in err.text and "nan_test.safetensors" in err.text, err.text
    err = _expect_error(comfy_server, _load_into_blend(comfy_server, "pickled.safetensors"))
    assert "not a safetensors file" in err.text and "pickles are never loaded" in err.text, err.text


def test_layer_out_of_range_names_the_valid_range(comfy_server):
    p, ids = tiny_style_prompt(comfy_server)
    p[ids["encode"]]["inputs"]["layers"] = "-20"
    err = _expect_error(comfy_server, p)
    assert "layer -20 is out of range" in err.text and "-9..-1" in err.text, err.text


def test_frontend_extension_is_served(comfy_server):
    listed = comfy_server.get_json("/extensions")
    ours = [u for u in listed if "/comfyui-zimage-vl/" in u]
    # zimage_vl.js and the pure module it imports (block_weights_core.js); help pages are .md, not scripts
    assert sorted(ours) == ["/extensions/comfyui-zimage-vl/block_weights_core.js",
                            "/extensions/comfyui-zimage-vl/zimage_vl.js"], listed
    js = comfy_server.get_bytes("/extensions/comfyui-zimage-vl/zimage_vl.js").decode()
    assert "registerExtension" in js and "ZImageVL_Inspect" in js
