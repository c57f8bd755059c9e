"""The pack's pyproject.toml as the host's own Comfy Registry parser reads it (no server needed)."""
from __future__ import annotations

import re
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


# The Comfy Registry's published rules for pyproject.toml (docs.comfy.org/registry/specifications).
NAME_RULE = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
ICON_TYPES = {"PNG", "JPEG", "GIF"}
ICON_MAX = (800, 400)


def test_registry_rules(config):
    project, comfy = config.project, config.tool_comfy
    assert len(project.name) < 100 and NAME_RULE.match(project.name), project.name
    assert SEMVER.match(project.version), project.version
    assert project.license.text or (REPO_ROOT / project.license.file).is_file()
    assert project.urls.repository.startswith("https://")
    assert re.match(r"^[a-z0-9][a-z0-9-]*$", comfy.publisher_id), comfy.publisher_id
    assert re.match(r"^(>=|==|<=|>|<|~=)\s*\d+\.\d+\.\d+", project.supported_comfyui_version)
    for model in comfy.models:
        assert model.location.startswith("/") and model.model_url.startswith("https://"), model


def test_icon_is_a_real_file_in_the_pack_within_the_registry_limits(config):
    from PIL import Image

    url = config.tool_comfy.icon
    assert url.startswith("https://") and "/main/" in url, url
    path = REPO_ROOT / url.split("/main/", 1)[1]
    assert path.is_file(), f"{url} names {path}, which is not in the pack"
    with Image.open(path) as im:
        assert im.format in ICON_TYPES and im.width <= ICON_MAX[0] and im.height <= ICON_MAX[1], (im.format, im.size)
