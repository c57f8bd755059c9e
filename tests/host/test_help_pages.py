"""Every pack node has a help page (web/docs/<node id>.md) that the real frontend can fetch and that names
each of the node's inputs as the host's /object_info lists them — a new input cannot go undocumented."""
from __future__ import annotations

import re
import urllib.error

from tools.host_harness import PACK_LINK_NAME, REPO_ROOT

DOCS = REPO_ROOT / "web" / "docs"
PACK_MODULE = "custom_nodes." + PACK_LINK_NAME


def pack_nodes(server) -> dict:
    info = server.object_info()
    nodes = {k: v for k, v in info.items() if v.get("python_module", "").split(".")[:2] == PACK_MODULE.split(".")}
    assert len(nodes) >= 9, sorted(nodes)  # the pack's nodes are registered at all
    return nodes


def test_every_pack_node_has_a_served_help_page_naming_each_input(comfy_server):
    problems = []
    for node_id, spec in sorted(pack_nodes(comfy_server).items()):
        page = DOCS / f"{node_id}.md"
        if not page.is_file():
            problems.append(f"{node_id}: no help page web/docs/{node_id}.md")
            continue
        text = page.read_text(encoding="utf-8")
        # the URL frontend 1.47 fetches (nodeHelpService: /extensions/<pack>/docs/<node id>.md)
        served = comfy_server.get_bytes(f"/extensions/{PACK_LINK_NAME}/docs/{node_id}.md").decode("utf-8")
        if served != text:
            problems.append(f"{node_id}: the server does not serve web/docs/{node_id}.md as is")
        if not text.startswith("# "):
            problems.append(f"{node_id}: the page must start with a '# title' line")
        inputs = [n for section in ("required", "optional") for n in (spec["input"].get(section) or {})]
        for name in inputs:
            if f"`{name}`" not in text:
                problems.append(f"{node_id}: input `{name}` is not documented (write it in backticks)")
    assert not problems, "\n".join(problems)


def test_pictures_on_help_pages_exist_and_are_served(comfy_server):
    pictures = []
    for page in sorted(DOCS.glob("*.md")):
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            assert not target.startswith(("http:", "https:")), f"{page.name}: pictures must ship with the pack"
            assert (DOCS / target).is_file(), f"{page.name}: picture {target} missing in web/docs"
            pictures.append(target)
            body = comfy_server.get_bytes(f"/extensions/{PACK_LINK_NAME}/docs/{target}")
            assert body[:8] == b"\x89PNG\r\n\x1a\n", f"{target} is not served as a PNG"
    assert pictures, "no help page shows a picture (the Inspect page should)"


def test_a_missing_help_page_is_a_404_not_an_html_fallback(comfy_server):
    """The frontend treats an HTML answer as 'no help'; a wrong node id must not look like a page."""
    try:
        comfy_server.get_bytes(f"/extensions/{PACK_LINK_NAME}/docs/ZImageVL_NoSuchNode.md")
    except urllib.error.HTTPError as e:
        assert e.code == 404
    else:
        raise AssertionError("a help page for a node that does not exist was served")
