"""Host tests: Save / Load VL Direction and Save / Load VL Calibration in the REAL ComfyUI server on tiny
models — saved and loaded back in one prompt they give the very same latent as the unsaved value; a loaded
map for another layer is refused where it is applied."""

from __future__ import annotations

import numpy as np

from tests.host.test_research import expect_error, latent, save_latent, tiny
from tools.host_harness import add_node, node_of


def _through_a_file(p: dict, source: str, kind: str, input_name: str, prefix: str) -> tuple[str, str]:
    """source → Save <kind> → Load <kind> (linked by the saved name); returns (save id, load id)."""
    save = add_node(p, f"ZImageVL_Save{kind}", {input_name: [source, 0], "filename_prefix": prefix})
    load = add_node(p, f"ZImageVL_Load{kind}", {"name": [save, 0]})
    return save, load


def _saved(server, entry: dict, save: str, folder: str) -> str:
    text = "".join(entry["outputs"][save]["text"])
    assert text.startswith(f"saved {folder}/") and text.endswith(".safetensors"), text
    name = text[len("saved "):]
    assert (server.models_dir / "vl_embeddings" / name).stat().st_size > 0
    return name


def test_a_direction_saved_and_loaded_in_one_prompt_steers_exactly_like_the_original(comfy_server):
    p = tiny(comfy_server, "VL Steering")
    out = save_latent(p)
    direct = latent(comfy_server, comfy_server.submit(p), out)
    save, load = _through_a_file(p, node_of(p, "ZImageVL_SteeringDirection"), "Direction", "direction",
                                 "research_files/direction")
    p[node_of(p, "ZImageVL_ApplyDirection")]["inputs"]["directions.direction_0"] = [load, 0]
    entry = comfy_server.submit(p)
    _saved(comfy_server, entry, save, "research_files")
    assert np.array_equal(latent(comfy_server, entry, out), direct)


def test_a_calibration_saved_and_loaded_in_one_prompt_maps_exactly_like_the_original(comfy_server):
    p = tiny(comfy_server, "VL Calibration")
    out = save_latent(p)
    direct = latent(comfy_server, comfy_server.submit(p), out)
    save, load = _through_a_file(p, node_of(p, "ZImageVL_FitCalibration"), "Calibration", "calibration",
                                 "research_files/calibration")
    p[node_of(p, "ZImageVL_ApplyCalibration")]["inputs"]["calibration"] = [load, 0]
    entry = comfy_server.submit(p)
    name = _saved(comfy_server, entry, save, "research_files")
    assert np.array_equal(latent(comfy_server, entry, out), direct)

    # the saved map (fitted at VL layer -3), loaded by name, applied to an encode at -4: refused
    p = tiny(comfy_server, "VL Calibration")
    fit = node_of(p, "ZImageVL_FitCalibration")
    load = add_node(p, "ZImageVL_LoadCalibration", {"name": name})
    p[node_of(p, "ZImageVL_ApplyCalibration")]["inputs"]["calibration"] = [load, 0]
    del p[fit]
    p[node_of(p, "ZImageVL_Encode")]["inputs"]["layers"] = "-4"
    expect_error(comfy_server, p, "fitted at VL layer(s)", "encode with the calibration's layers")


def test_loading_an_embeddings_file_as_a_direction_is_refused_with_what_to_do(comfy_server):
    p = tiny(comfy_server, "VL Steering")
    encode = add_node(p, "ZImageVL_Encode", {
        "image": p[node_of(p, "ZImageVL_SteeringDirection")]["inputs"]["positive"],
        "clip": p[node_of(p, "ZImageVL_SteeringDirection")]["inputs"]["clip"], "prompt": "a picture",
        "layers": "-3", "token_mode": "full", "placement": "after_image", "max_image_tokens": 64,
        "resize": "fit_budget", "outlier_threshold": 10.0, "outlier_mode": "none"})
    save = add_node(p, "ZImageVL_SaveEmbeds", {"vl_embeds": [encode, 0], "filename_prefix": "research_files/emb"})
    load = add_node(p, "ZImageVL_LoadDirection", {"name": [save, 0]})
    p[node_of(p, "ZImageVL_ApplyDirection")]["inputs"]["directions.direction_0"] = [load, 0]
    expect_error(comfy_server, p, "not a VL direction", "Save VL Direction")
