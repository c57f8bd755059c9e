"""DiT Layer Injection, second generation, through the REAL ComfyUI server (conftest.py) on tiny models: the shipped
reference-attention, two-regions and composition + style workflows; reference_attention from a LATENT (VAEEncode) and from an IMAGE + VAE;
a masked extra_attention; steer_image with a direction from VL Steering Direction. Strength 0 or an all-zero mask is
the plain model bit for bit; the refusals are node errors."""
from __future__ import annotations

import numpy as np
import pytest

from tools.host_harness import (add_node, load_api_workflow, node_of, nodes_of, prune_to, set_inputs,
                                swap_loaders_for_tiny)

REFERENCE = "VL Reference Attention"
REGIONS = "VL Two Regions"
COMPOSITION = "VL Composition And Style"
IMAGES = ["test_scene.png", "style_watercolor_forest.png", "purple_hexagon.png"]
SIZE = 128
SEED = 1234


def tiny(server, name: str, **injection) -> tuple[dict, dict]:
    """A shipped workflow on tiny models: 128² (the reference scaled to it), 4 steps, 64 VL image tokens; the
    injection inputs given are set on every DiT Layer Injection node. ids: sampler, ms (ModelSamplingAuraFlow),
    latent (a SaveLatent of the sampler), inject (the injection nodes in id order)."""
    p = swap_loaders_for_tiny(load_api_workflow(name), seed=0)
    for k, nid in enumerate(sorted(nodes_of(p, "LoadImage"), key=int)):
        p[nid]["inputs"]["image"] = server.stage_ref_image(IMAGES[k % len(IMAGES)], size=SIZE)
    set_inputs(p, "EmptySD3LatentImage", width=SIZE, height=SIZE, batch_size=1)
    set_inputs(p, "KSampler", seed=SEED, steps=4)
    set_inputs(p, "ZImageVL_Encode", max_image_tokens=64)
    if nodes_of(p, "ImageScale"):
        set_inputs(p, "ImageScale", width=SIZE, height=SIZE)
    if injection:
        set_inputs(p, "ZImageVL_DiTInjection", **injection)
    ids = {"sampler": node_of(p, "KSampler"), "ms": node_of(p, "ModelSamplingAuraFlow"),
           "inject": sorted(nodes_of(p, "ZImageVL_DiTInjection"), key=int)}
    ids["latent"] = add_node(p, "SaveLatent", {"samples": [ids["sampler"], 0], "filename_prefix": "latents/regions"})
    return p, ids


def run(server, p: dict, ids: dict):
    from safetensors.numpy import load_file

    entry = server.submit(prune_to(p, [ids["latent"]]))
    files = server.output_files(entry, ids["latent"], "latents")
    assert len(files) == 1, entry.get("outputs", {}).get(ids["latent"])
    lat = load_file(str(files[0]))["latent_tensor"]
    assert lat.shape == (1, 16, SIZE // 8, SIZE // 8) and np.isfinite(lat).all()
    return lat


def sample_from(p: dict, ids: dict, node: str) -> dict:
    """The KSampler fed by `node` (an injection, or ids['ms'] for the plain model)."""
    p[ids["sampler"]]["inputs"]["model"] = [node, 0]
    return p


def plain(server, name: str):
    p, ids = tiny(server, name)
    return run(server, sample_from(p, ids, ids["ms"]), ids)


def differs(a, b) -> bool:
    return float(np.abs(a - b).max()) > 1e-6


def node_error(server, p: dict, ids: dict) -> str:
    with pytest.raises(server.Error) as ei:
        server.submit(prune_to(p, [ids["latent"]]))
    assert ei.value.node_type == "ZImageVL_DiTInjection", ei.value.text
    return ei.value.text


# --------------------------------------------------------------------------- reference attention

def test_reference_attention_workflow_acts_with_and_without_the_vl_tokens(comfy_server):
    s = comfy_server
    base = plain(s, REFERENCE)
    p, ids = tiny(s, REFERENCE)
    (inj,) = ids["inject"]
    assert p[p[inj]["inputs"]["reference"][0]]["class_type"] == "VAEEncode"
    with_vl = run(s, p, ids)
    del p[inj]["inputs"]["vl_embeds"]
    latent_only = run(s, p, ids)
    assert differs(with_vl, base) and differs(latent_only, base) and differs(with_vl, latent_only)


@pytest.mark.parametrize("noise", ["matched", "clean"])
def test_reference_image_plus_vae_is_the_vae_encoded_latent(comfy_server, noise):
    """reference_image + vae encodes inside the node exactly as VAEEncode does: the same result bit for bit."""
    s = comfy_server
    p, ids = tiny(s, REFERENCE, reference_noise=noise)
    via_latent = run(s, p, ids)
    (inj,) = ids["inject"]
    encode = p[inj]["inputs"].pop("reference")[0]
    p[inj]["inputs"].update(reference_image=list(p[encode]["inputs"]["pixels"]), vae=list(p[encode]["inputs"]["vae"]))
    via_image = run(s, p, ids)
    assert np.array_equal(via_image, via_latent), float(np.abs(via_image - via_latent).max())
    assert differs(via_image, plain(s, REFERENCE))


@pytest.mark.parametrize("settings", [dict(reference_noise="matched"), dict(reference_noise="clean"),
                                      dict(share="joint", reference_adain=True)])
def test_reference_attention_at_strength_zero_is_the_plain_model(comfy_server, settings):
    s = comfy_server
    p, ids = tiny(s, REFERENCE, strength=0.0, **settings)
    assert np.array_equal(run(s, p, ids), plain(s, REFERENCE))
    p, ids = tiny(s, REFERENCE, strength=0.8, **settings)
    assert differs(run(s, p, ids), plain(s, REFERENCE))


def test_a_four_channel_sd_latent_is_refused(comfy_server):
    p, ids = tiny(comfy_server, REFERENCE)
    sd = add_node(p, "EmptyLatentImage", {"width": SIZE, "height": SIZE, "batch_size": 1})
    p[ids["inject"][0]]["inputs"]["reference"] = [sd, 0]
    text = node_error(comfy_server, p, ids)
    assert "4 channels" in text and "16" in text, text


# --------------------------------------------------------------------------- chained references

def test_composition_and_style_injections_both_act(comfy_server):
    """The shipped chain (composition early, style late) with the tiny model's two blocks standing in for the
    presets ('late' selects no block of a 2-block model): the result differs from each injection alone."""
    s = comfy_server
    p, ids = tiny(s, COMPOSITION)
    first, second = ids["inject"]
    assert p[second]["inputs"]["model"] == [first, 0] and p[ids["sampler"]]["inputs"]["model"] == [second, 0]
    assert (p[first]["inputs"]["block_weights"], p[second]["inputs"]["block_weights"]) == ("early", "late")
    p[first]["inputs"]["block_weights"], p[second]["inputs"]["block_weights"] = "0", "1"
    both = run(s, p, ids)
    composition_only = run(s, sample_from(p, ids, first), ids)
    style_only = dict(p)
    style_only[second] = {**p[second], "inputs": {**p[second]["inputs"], "model": [ids["ms"], 0]}}
    style_only = run(s, sample_from(style_only, ids, second), ids)
    base = plain(s, COMPOSITION)
    assert differs(composition_only, base) and differs(style_only, base)
    assert differs(both, composition_only) and differs(both, style_only)


# --------------------------------------------------------------------------- regions (masked extra_attention)

def test_two_regions_workflow_both_references_act(comfy_server):
    s = comfy_server
    base = plain(s, REGIONS)
    p, ids = tiny(s, REGIONS)
    first, second = ids["inject"]
    assert {p[first]["inputs"]["mask"][0], p[second]["inputs"]["mask"][0]} == \
        {node_of(p, "MaskComposite"), node_of(p, "InvertMask")}
    both = run(s, p, ids)
    left_only = run(s, sample_from(p, ids, first), ids)
    assert differs(both, base) and differs(left_only, base) and differs(both, left_only)


def test_the_mask_limits_where_the_reference_acts(comfy_server):
    s = comfy_server
    p, ids = tiny(s, REGIONS)
    first = ids["inject"][0]
    sample_from(p, ids, first)
    left_half = run(s, p, ids)
    whole = dict(p)
    whole[first] = {**p[first], "inputs": {k: v for k, v in p[first]["inputs"].items() if k != "mask"}}
    assert differs(left_half, run(s, whole, ids))
    # an all-zero mask (the left block painted 0) and strength 0 each leave the model exactly as it was
    base = plain(s, REGIONS)
    set_inputs(p, "SolidMask", value=0.0)
    assert np.array_equal(run(s, p, ids), base)
    p, ids = tiny(s, REGIONS, strength=0.0)
    assert np.array_equal(run(s, p, ids), base)


# --------------------------------------------------------------------------- steering inside blocks

def steer_prompt(server, **settings) -> tuple[dict, dict]:
    """The two-regions workflow with its first injection turned into steer_image (left-half mask): a direction
    from VL Steering Direction (reference A vs reference B), no vl_embeds."""
    p, ids = tiny(server, REGIONS)
    a, b = sorted(nodes_of(p, "LoadImage"), key=int)
    clip = p[sorted(nodes_of(p, "ZImageVL_Encode"), key=int)[0]]["inputs"]["clip"]
    direction = add_node(p, "ZImageVL_SteeringDirection", {
        "positive": [a, 0], "negative": [b, 0], "clip": list(clip), "prompt": "Describe this image.",
        "layers": "-6", "method": "mean_diff", "num_tokens": 1, "token_mode": "image", "max_image_tokens": 64,
        "offload_after_encode": True})
    first = ids["inject"][0]
    inputs = p[first]["inputs"]
    del inputs["vl_embeds"]
    inputs.update({"method": "steer_image", "strength": 0.5, "direction": [direction, 0], **settings})
    return sample_from(p, ids, first), ids


def test_steer_image_acts_where_masked_and_not_at_strength_zero(comfy_server):
    s = comfy_server
    base = plain(s, REGIONS)
    p, ids = steer_prompt(s)
    masked = run(s, p, ids)
    del p[ids["inject"][0]]["inputs"]["mask"]
    everywhere = run(s, p, ids)
    assert differs(masked, base) and differs(everywhere, base) and differs(masked, everywhere)
    p, ids = steer_prompt(s, strength=0.0)
    assert np.array_equal(run(s, p, ids), base)


def test_steer_image_with_vl_embeds_connected_is_refused(comfy_server):
    p, ids = steer_prompt(comfy_server)
    first = ids["inject"][0]
    p[first]["inputs"]["vl_embeds"] = [sorted(nodes_of(p, "ZImageVL_Encode"), key=int)[0], 0]
    text = node_error(comfy_server, p, ids)
    assert "vl_embeds is connected but method steer_image" in text, text
