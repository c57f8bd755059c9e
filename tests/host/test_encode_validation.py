"""VL Encode's inputs through the REAL ComfyUI 0.29 server: the host's own checks (types, min/max, options)
apply to every input; the pack's `layers` check reports one error once; an image whose finite pixels make
the model's states NaN is refused naming the input, the image and the likely cause."""

from __future__ import annotations

import pytest

from tools.host_harness import add_node

GOOD = {"prompt": "a picture", "layers": "-3", "token_mode": "full", "placement": "after_image",
        "max_image_tokens": 64, "resize": "fit_budget", "outlier_threshold": 10.0, "outlier_mode": "none"}


def encode_prompt(server, image_chain: int = 0, **inputs) -> tuple[dict, str]:
    """LoadImage -> NormalizeImages ×image_chain (mean 0, std 0.001: ×1000 each) -> VL Encode (tiny clip) -> Inspect."""
    p: dict = {}
    image = [add_node(p, "LoadImage", {"image": server.stage_ref_image("test_scene.png", size=64)}), 0]
    for _ in range(image_chain):
        image = [add_node(p, "NormalizeImages", {"images": image, "mean": 0.0, "std": 0.001}), 0]
    clip = add_node(p, "TinyQwen3VLClip", {"seed": 0, "hidden_size": 256})
    enc = add_node(p, "ZImageVL_Encode", {"image": image, "clip": [clip, 0], **{**GOOD, **inputs}})
    ins = add_node(p, "ZImageVL_Inspect", {"vl_embeds": [enc, 0], "outlier_threshold": 10.0})
    add_node(p, "PreviewImage", {"images": [ins, 0]})
    return p, enc


def encode_errors(server, **inputs) -> list[dict]:
    """The validation errors the server reports for the VL Encode node (the prompt must be refused)."""
    p, enc = encode_prompt(server, **inputs)
    with pytest.raises(server.Error) as ei:
        server.post_prompt(p)
    print("\nserver said:", ei.value.text)
    node_errors = ei.value.node_errors or {}
    assert set(node_errors) == {enc}, ei.value.text          # only VL Encode is refused
    return node_errors[enc]["errors"]


@pytest.mark.parametrize("inputs,error_type,input_name", [
    ({"max_image_tokens": 10 ** 12}, "value_bigger_than_max", "max_image_tokens"),
    ({"max_image_tokens": 0}, "value_smaller_than_min", "max_image_tokens"),
    ({"outlier_threshold": 1.0}, "value_smaller_than_min", "outlier_threshold"),
    ({"max_image_tokens": "many"}, "invalid_input_type", "max_image_tokens"),
    ({"outlier_threshold": "loud"}, "invalid_input_type", "outlier_threshold"),
    ({"token_mode": "everything"}, "value_not_in_list", "token_mode"),
    ({"placement": "middle"}, "value_not_in_list", "placement"),
])
def test_comfyuis_own_checks_apply_to_every_input(comfy_server, inputs, error_type, input_name):
    errors = encode_errors(comfy_server, **inputs)
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [(error_type, input_name)], errors


def test_a_bad_layers_value_is_reported_once(comfy_server):
    errors = encode_errors(comfy_server, layers="-6,x")
    assert len(errors) == 1, errors
    (err,) = errors
    assert err["type"] == "custom_validation_failed" and err["extra_info"]["input_name"] == "layers", err
    assert "must be integers separated by commas" in err["details"], err


def test_good_inputs_validate_and_run(comfy_server):
    """Control for the refusals above: the same graph with the declared values runs."""
    p, enc = encode_prompt(comfy_server, max_image_tokens=16384, outlier_threshold=1.01)
    entry = comfy_server.submit(p)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_huge_finite_pixels_are_refused_after_the_forward(comfy_server):
    """Ten ×1000 normalisations push the pixels to ~1e30: finite, but the model's states become NaN."""
    p, enc = encode_prompt(comfy_server, image_chain=10)
    with pytest.raises(comfy_server.Error) as ei:
        comfy_server.submit(p)
    err = ei.value
    print("\nserver said:", err.text)
    assert err.node_type == "ZImageVL_Encode", err.text
    assert "input 'image', image 0" in err.text and "NaN/Inf hidden-state values" in err.text, err.text
    assert "pixel values outside [0, 1]" in err.text and "e+" in err.text, err.text
