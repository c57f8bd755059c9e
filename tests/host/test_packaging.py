"""The pack's pyproject.toml as the host's own Comfy Registry parser reads it (no server needed)."""
from __future__ import annotations

import sys

import pytest

from tools.host_harness import REPO_ROOT, comfyui_path


@pytest.fixture(scope="module")
def config():
    root = comfyui_path()
    if root is None:
        pytest.skip("no ComfyUI host: registry metadata not checked with the host's parser")
    sys.path.insert(0, str(root))
    try:
        from comfy_config.config_parser import extract_node_configuration
    finally:
        sys.path.remove(str(root))
    return extract_node_configuration(str(REPO_ROOT))


def test_registry_metadata_parses_with_the_hosts_parser(config):
    assert config.project.name == "comfyui-zimage-vl"
    assert config.project.supported_comfyui_version == ">=0.29.0"
    assert config.tool_comfy.publisher_id and config.tool_comfy.display_name
    assert config.tool_comfy.web == "web" and (REPO_ROOT / "web" / "zimage_vl.js").is_file()
    assert any("transformers" in d for d in config.project.dependencies)
    assert {m.location.rsplit("/", 1)[-1] for m in config.tool_comfy.models} == {
        "z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors"}
