"""DiT Layer Injection through the REAL ComfyUI server (conftest.py): the shipped API workflow on tiny models,
every method, exactness outside the step window, and the refusals as node errors."""
from __future__ import annotations

import pytest

from tools.host_harness import (
    add_node,
    load_api_workflow,
    node_of,
    prune_to,
    set_image,
    set_inputs,
    swap_loaders_for_tiny,
)

WORKFLOW = "VL DiT Layer Injection"
SEED = 1234


def tiny_injection_prompt(server, *, width=256, vl_width=None, size=128, steps=4, **injection):
    p = swap_loaders_for_tiny(load_api_workflow(WORKFLOW), seed=0, width=width, vl_width=vl_width)
    set_image(p, server.stage_ref_image("test_scene.png", size=size))
    set_inputs(p, "EmptySD3LatentImage", width=size, height=size, batch_size=1)
    set_inputs(p, "KSampler", seed=SEED, steps=steps)
    set_inputs(p, "ZImageVL_Encode", max_image_tokens=64)
    if injection:
        set_inputs(p, "ZImageVL_DiTInjection", **injection)
    ids = {"sampler": node_of(p, "KSampler"), "inject": node_of(p, "ZImageVL_DiTInjection"),
           "save": node_of(p, "SaveImage")}
    ids["latent"] = add_node(p, "SaveLatent", {"samples": [ids["sampler"], 0], "filename_prefix": "latents/inject"})
    return p, ids


def _latent(server, entry, node_id):
    from safetensors.numpy import load_file
    files = server.output_files(entry, node_id, "latents")
    assert len(files) == 1, entry.get("outputs", {}).get(node_id)
    return load_file(str(files[0]))["latent_tensor"]


def _run_latent(server, p, ids):
    return _latent(server, server.submit(prune_to(p, [ids["latent"]])), ids["latent"])


def _bypass_injection(p, ids):
    """The same graph with the KSampler fed straight from ModelSamplingAuraFlow."""
    p[ids["sampler"]]["inputs"]["model"] = list(p[ids["inject"]]["inputs"]["model"])
    return p


def test_shipped_injection_workflow_runs_on_tiny_models(comfy_server):
    from PIL import Image
    import numpy as np

    p, ids = tiny_injection_prompt(comfy_server)
    entry = comfy_server.submit(p)
    files = comfy_server.output_files(entry, ids["save"], "images")
    assert files
    with Image.open(files[0]) as im:
        assert im.size == (128, 128)
    lat = _latent(comfy_server, entry, ids["latent"])
    assert lat.shape == (1, 16, 16, 16) and np.isfinite(lat).all()


def test_shipped_injection_workflow_matches_the_brief():
    api = load_api_workflow(WORKFLOW)
    ks = api[node_of(api, "KSampler")]["inputs"]
    inj = api[ks["model"][0]]
    assert inj["class_type"] == "ZImageVL_DiTInjection"
    ms = api[inj["inputs"]["model"][0]]
    assert ms["class_type"] == "ModelSamplingAuraFlow" and ms["inputs"]["shift"] == 3.0
    assert api[ms["inputs"]["model"][0]]["inputs"]["unet_name"] == "z_image_turbo_bf16.safetensors"
    enc = api[inj["inputs"]["vl_embeds"][0]]
    assert enc["class_type"] == "ZImageVL_Encode"
    assert api[enc["inputs"]["clip"][0]]["inputs"]["clip_name"] == "qwen3vl_4b.safetensors"
    assert api[enc["inputs"]["image"][0]]["class_type"] == "LoadImage"
    pos = api[ks["positive"][0]]
    assert pos["class_type"] == "CLIPTextEncode"
    te = api[pos["inputs"]["clip"][0]]["inputs"]
    assert (te["clip_name"], te["type"]) == ("qwen_3_4b.safetensors", "lumina2")
    assert (ks["steps"], ks["cfg"]) == (8, 1.0)
    latent = api[ks["latent_image"][0]]
    assert latent["class_type"] == "EmptySD3LatentImage" and latent["inputs"]["width"] == latent["inputs"]["height"] == 1024
    assert api[node_of(api, "VAELoader")]["inputs"]["vae_name"] == "ae.safetensors"
    assert node_of(api, "SaveImage") and node_of(api, "VAEDecode")


@pytest.mark.parametrize("method", ["extra_attention", "caption_stream", "concat"])
def test_every_method_changes_the_result_and_a_window_past_the_last_step_does_not(comfy_server, method):
    import numpy as np

    p, ids = tiny_injection_prompt(comfy_server, method=method, strength=0.8, token_budget=32)
    plain = _run_latent(comfy_server, _bypass_injection(tiny_injection_prompt(comfy_server)[0], ids), ids)
    injected = _run_latent(comfy_server, p, ids)
    assert np.isfinite(injected).all()
    assert not np.array_equal(injected, plain), f"{method} changed nothing"
    # 4 simple steps are at 0, 25, 50, 75 %: a window starting at 90 % never opens
    late, _ = tiny_injection_prompt(comfy_server, method=method, strength=0.8, token_budget=32, start_percent=0.9)
    assert np.array_equal(_run_latent(comfy_server, late, ids), plain)


def test_width_mismatch_is_a_node_error_naming_both_widths(comfy_server):
    p, ids = tiny_injection_prompt(comfy_server, vl_width=384)
    with pytest.raises(comfy_server.Error) as ei:
        comfy_server.submit(prune_to(p, [ids["latent"]]))
    text = ei.value.text
    assert ei.value.node_type == "ZImageVL_DiTInjection", text
    assert "384" in text and "256" in text and "Qwen3-VL-4B" in text


@pytest.mark.parametrize("settings, match", [(dict(block_weights="5"), "2 main blocks"),
                                             (dict(start_percent=0.5, end_percent=0.5), "start_percent")])
def test_bad_settings_are_node_errors(comfy_server, settings, match):
    p, ids = tiny_injection_prompt(comfy_server, **settings)
    with pytest.raises(comfy_server.Error) as ei:
        comfy_server.submit(prune_to(p, [ids["latent"]]))
    assert ei.value.node_type == "ZImageVL_DiTInjection" and match in ei.value.text, ei.value.text
