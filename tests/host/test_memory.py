"""Host test (real ComfyUI server, tiny models, CPU): VL Encode's offload_after_encode.

The shipped style-reference workflow runs with a test-only observer (TinyMemoryProbe) in front of the
KSampler that records ``comfy.model_management.current_loaded_models`` just before the sampler loads its
models (every encode has run by then) and at the first denoising step. With offloading on (the default)
the Qwen3-VL model is not among them; with it off it stays loaded next to the diffusion model (ComfyUI
keeps models cached while memory allows). GPU numbers at real sizes: bench/README.md.
"""

from __future__ import annotations

import json

import pytest

from tools.host_harness import add_node, load_api_workflow, node_of, set_image, set_inputs, swap_loaders_for_tiny

STYLE = "VL Style Reference"


def probe_prompt(server, *, offload: bool | None, vl_backend: str, filename: str) -> dict:
    p = swap_loaders_for_tiny(load_api_workflow(STYLE), seed=0, width=256, vl_backend=vl_backend)
    set_image(p, server.stage_ref_image("test_scene.png", size=128))
    set_inputs(p, "EmptySD3LatentImage", width=128, height=128, batch_size=1)
    set_inputs(p, "KSampler", seed=7, steps=2)
    encode = node_of(p, "ZImageVL_Encode")
    if offload is None:
        p[encode]["inputs"].pop("offload_after_encode", None)      # the shipped workflow: the node's default
    else:
        p[encode]["inputs"]["offload_after_encode"] = offload
    sampler = node_of(p, "KSampler")
    probe = add_node(p, "TinyMemoryProbe", {"model": p[sampler]["inputs"]["model"], "filename": filename},
                     title="memory probe")
    p[sampler]["inputs"]["model"] = [probe, 0]
    return p


def kinds(snapshot: list[dict]) -> list[str]:
    return sorted(m["kind"] for m in snapshot)


@pytest.mark.parametrize("vl_backend", ["native", "transformers"])
def test_vl_model_is_not_resident_during_sampling(comfy_server, vl_backend):
    if vl_backend == "transformers" and comfy_server.tiny_hf_error:
        pytest.skip(f"tiny transformers Qwen3-VL folder unavailable: {comfy_server.tiny_hf_error}")
    records = {}
    for offload in (False, True, None):
        name = f"memory_probe_{vl_backend}_{offload}.json"
        comfy_server.submit(probe_prompt(comfy_server, offload=offload, vl_backend=vl_backend, filename=name))
        records[offload] = json.loads((comfy_server.output_dir / name).read_text(encoding="utf-8"))
        print(f"\n{vl_backend} offload_after_encode={offload}:",
              {k: kinds(v) if isinstance(v, list) else v for k, v in records[offload].items()})

    for offload, rec in records.items():
        assert rec["steps"] >= 2, rec
        assert "diffusion_model" in kinds(rec["after_load"]) and "diffusion_model" in kinds(rec["step"])
        assert "text_encoder" in kinds(rec["before_load"])       # Z-Image's own text encoder: ComfyUI's policy
    kept = records[False]
    assert "qwen3vl" in kinds(kept["before_load"]) and "qwen3vl" in kinds(kept["step"]), kept
    for offload in (True, None):                                   # None: the node's default (True)
        rec = records[offload]
        for phase in ("before_load", "after_load", "step"):
            assert "qwen3vl" not in kinds(rec[phase]), (offload, phase, rec[phase])


def test_memory_probe_is_a_test_node_with_tooltips(comfy_server):
    info = comfy_server.object_info()["TinyMemoryProbe"]
    assert info["python_module"] == "custom_nodes.zimage_vl_tiny_nodes"
    assert info["output"] == ["MODEL"]
    spec = info["input"]["required"]
    assert all(opts[1].get("tooltip") for opts in spec.values())
    encode = comfy_server.object_info()["ZImageVL_Encode"]["input"]
    opts = encode["optional"]["offload_after_encode"]
    assert opts[0] == "BOOLEAN" and opts[1]["default"] is True and opts[1].get("advanced") and opts[1]["tooltip"]
