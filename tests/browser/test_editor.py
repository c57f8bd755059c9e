"""The pack in the real editor (ComfyUI frontend 1.47 in headless Chromium, see conftest.py): the per-block
weight editor of DiT Layer Injection, saving / reloading / queueing what it wrote, the block-count setting,
a help page, a subgraph blueprint dropped from the node search, the template browser's titles and thumbnails,
a template run on tiny models with its report box inside its node. Assertions read the DOM, the graph and the saved JSON; screenshots are only kept."""
from __future__ import annotations

import json
import time
from urllib.parse import quote

import pytest

from tools.editor_assets import template_title_problems
from tools.browser_bridge import BrowserError
from tools.host_harness import PACK_LINK_NAME, REPO_ROOT, load_ui_workflow, ui_workflow_names
from tests.block_weights_format import format_block_weights
from vl_core.schedule import parse_block_weights, preset_blocks

from .conftest import ARTIFACTS
from .tiny_ui import swap_ui_loaders_for_tiny

INJECTION = "VL DiT Layer Injection"
STYLE = "VL Style Reference"
DIT = "ZImageVL_DiTInjection"
N = 30  # the editor's default block count (setting ZImageVL.BlockEditor.Blocks)
BLOCKS_SETTING = "ZImageVL.BlockEditor.Blocks"

LOAD_JS = "async (wf) => { await app.loadGraphData(wf, true, false); await new Promise((r) => setTimeout(r, 200)); }"
EDITOR_JS = """(type) => {
  const node = app.graph.nodes.find((n) => n.type === type);
  const ed = node.zimageVlEditor;
  return { id: node.id, spec: node.widgets.find((w) => w.name === 'block_weights').value,
           weights: [...ed.bars.children].map((b) => Number(b.dataset.weight)), error: ed.error ?? null };
}"""
# put the node at the top-left of the view at scale 1, so its editor is on screen; its bars' screen box
SHOW_BARS_JS = """(type) => {
  const node = app.graph.nodes.find((n) => n.type === type);
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [300 - node.pos[0], 120 - node.pos[1]];
  app.canvas.setDirty(true, true);
  return new Promise((res) => setTimeout(() => {
    const r = node.zimageVlEditor.bars.getBoundingClientRect();
    res({ x: r.x, y: r.y, width: r.width, height: r.height });
  }, 300));
}"""


def editor(page) -> dict:
    return page.evaluate(EDITOR_JS, DIT)


def bar_point(box: dict, block: int, weight: float, n: int = N) -> tuple[float, float]:
    """Screen point over ``block`` at the height that paints ``weight`` (top = 1, bottom = 0)."""
    return box["x"] + (block + 0.5) * box["width"] / n, box["y"] + (1 - weight) * box["height"]


def load(page, workflow: dict):
    page.evaluate(LOAD_JS, workflow)


def test_block_editor_paints_exactly_the_string_the_node_parses(page, browser_server):
    load(page, load_ui_workflow(INJECTION))
    state = editor(page)
    assert state["spec"] == "all" and state["weights"] == [1.0] * N  # bars restored from the shipped string

    page.click("[data-zimage-vl=block-editor] button[data-preset=early]")
    state = editor(page)
    early = set(preset_blocks("early", N))
    assert state["spec"] == "early"
    assert state["weights"] == [1.0 if i in early else 0.0 for i in range(N)] == parse_block_weights("early", N)

    box = page.evaluate(SHOW_BARS_JS, DIT)
    page.drag([bar_point(box, 12, 0.5), bar_point(box, 15, 0.5), bar_point(box, 17, 0.5)])
    expected = parse_block_weights("early", N)
    expected[12:18] = [0.5] * 6
    state = editor(page)
    assert state["weights"] == expected
    assert state["spec"] == format_block_weights(expected) == "0-9:1.0, 12-17:0.5"
    assert parse_block_weights(state["spec"], N) == expected

    page.drag([bar_point(box, 29, 0.25), bar_point(box, 27, 0.25)])  # right to left, a quarter
    expected[27:30] = [0.25] * 3
    state = editor(page)
    assert state["spec"] == format_block_weights(expected) and parse_block_weights(state["spec"], N) == expected


def test_painted_weights_survive_save_and_reload_and_reach_the_prompt(page, browser_server):
    wf = load_ui_workflow(INJECTION)
    dit = next(n for n in wf["nodes"] if n["type"] == DIT)
    spec = "0-4:0.5, 20-29:1.0"
    dit["widgets_values"][2] = spec
    load(page, wf)
    painted = editor(page)
    assert painted["weights"] == parse_block_weights(spec, N), painted

    # save through the user-data API the editor's Save uses, read the file the server wrote, load it back
    saved = page.evaluate("""async () => {
        const wf = app.graph.serialize();
        const r = await app.api.storeUserData('workflows/zvl_block_weights.json', JSON.stringify(wf), {overwrite: true});
        return r.status;
    }""")
    assert saved == 200
    on_disk = json.loads((browser_server.user_dir / "default" / "workflows" / "zvl_block_weights.json").read_text())
    node = next(n for n in on_disk["nodes"] if n["type"] == DIT)
    assert node["widgets_values"] == dit["widgets_values"]  # the editor adds nothing to the saved values

    load(page, load_ui_workflow(STYLE))  # something else in between
    load(page, on_disk)
    assert editor(page)["weights"] == parse_block_weights(spec, N) and editor(page)["spec"] == spec

    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    (api_node,) = [v for v in prompt.values() if v["class_type"] == DIT]
    assert api_node["inputs"]["block_weights"] == spec
    assert not any(k.startswith("zimage_vl") for k in api_node["inputs"])


def test_painted_graph_queues_and_runs_on_tiny_models(page, browser_server):
    image = browser_server.stage_ref_image("test_scene.png", size=64)
    wf = swap_ui_loaders_for_tiny(load_ui_workflow(INJECTION), image=image)
    load(page, wf)
    set_blocks(page, 2)  # the tiny Z-Image has 2 main blocks
    try:
        box = page.evaluate(SHOW_BARS_JS, DIT)
        page.click("[data-zimage-vl=block-editor] button[data-preset=clear]")
        page.drag([bar_point(box, 1, 0.75, n=2), bar_point(box, 1, 0.75, n=2)])
        spec = editor(page)["spec"]
    finally:
        set_blocks(page, N)
    assert spec == "1:0.75"
    before = set(browser_server.get_json("/history"))
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + 300
    new = set()
    while not new and time.monotonic() < deadline:
        new = set(browser_server.get_json("/history")) - before
        time.sleep(0.5)
    assert len(new) == 1, "the queued prompt never reached the history"
    entry = browser_server.wait_history(new.pop())
    (dit,) = [v for v in entry["prompt"][2].values() if v["class_type"] == DIT]
    assert dit["inputs"]["block_weights"] == spec
    save_id = next(k for k, v in entry["prompt"][2].items() if v["class_type"] == "SaveImage")
    assert browser_server.output_files(entry, save_id, "images")


def set_blocks(page, n: int):
    page.evaluate(f"async () => {{ await app.extensionManager.setting.set('{BLOCKS_SETTING}', {n}); }}")


def test_block_count_setting_redraws_the_bars_and_the_thirds(page):
    load(page, load_ui_workflow(INJECTION))
    try:
        set_blocks(page, 12)
        page.click("[data-zimage-vl=block-editor] button[data-preset=late]")
        state = editor(page)
        assert state["spec"] == "late"
        assert state["weights"] == parse_block_weights("late", 12) == [0.0] * 8 + [1.0] * 4  # ⌊3i/12⌋ = 2 from i = 8
        # a string naming blocks the editor does not show is kept and explained, not rewritten
        page.evaluate("""() => { const n = app.graph.nodes.find((n) => n.type === 'ZImageVL_DiTInjection');
                                 n.widgets.find((w) => w.name === 'block_weights').value = '27:0.5'; }""")
        page.wait_for("() => app.graph.nodes.find((n) => n.type === 'ZImageVL_DiTInjection').zimageVlEditor.error")
        state = editor(page)
        assert state["spec"] == "27:0.5" and "12 blocks" in state["error"]
    finally:
        set_blocks(page, N)


def test_help_page_opens_from_the_node_and_names_its_inputs(page):
    load(page, load_ui_workflow(INJECTION))
    page.evaluate(SHOW_BARS_JS, DIT)  # the node's title bar is now at (300, 120 - title height / 2) in the canvas
    c = page.evaluate("() => { const r = app.canvasEl.getBoundingClientRect(); return [r.x, r.y]; }")
    page.drag([(c[0] + 360, c[1] + 105), (c[0] + 360, c[1] + 105)])  # a click on the title selects the node
    page.click("[data-testid=info-button]")  # the selection toolbox's Info: the node's help page
    text = page.wait_for("""() => { const h = [...document.querySelectorAll('h2')].find((e) => e.textContent === 'The block-weight editor');
                                    return h ? h.parentElement.innerText : null; }""", timeout_s=30)
    inputs = page.evaluate(f"""() => {{ const n = app.graph.nodes.find((n) => n.type === '{DIT}');
        return [...new Set([...n.inputs.map((i) => i.name), ...n.widgets.map((w) => w.name)])]
            .filter((name) => !name.startsWith('zimage_vl')); }}""")
    assert "block_weights" in inputs and "vl_rope" in inputs
    for name in inputs:
        assert name in text, f"the help page shown in the editor does not name input {name}"


def test_blueprint_from_the_node_search_becomes_one_subgraph_node(page):
    page.evaluate("() => app.graph.clear()")
    box = page.evaluate("() => { const r = app.canvasEl.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; }")
    page.evaluate("() => app.canvas.setDirty(true, true)")
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.move(x, y)
    page.evaluate("() => new Promise((r) => setTimeout(r, 100))")
    for attempt in range(3):  # after other tests the first double-click can land while a dialog still closes
        page.press("Escape")
        page.dblclick(x, y)
        try:
            page.wait_for("() => document.activeElement && document.activeElement.tagName === 'INPUT'", timeout_s=5)
            break
        except BrowserError:
            if attempt == 2:
                raise
    page.type_text("VL Style Reference")
    page.wait_for("() => [...document.querySelectorAll('li, [role=option]')].some((e) => e.innerText.includes('VL Style Reference'))",
                  timeout_s=20)
    page.press("Enter")
    node = page.wait_for("""() => { const n = app.graph.nodes.find((n) => n.title === 'VL Style Reference');
        return n && { sub: !!n.isSubgraphNode?.(), inner: n.subgraph?.nodes.map((m) => m.type),
                      inputs: n.inputs.map((i) => i.type), outputs: n.outputs.map((o) => o.type) }; }""", timeout_s=20)
    assert node["sub"], node
    assert {"LoadImage", "ZImageVL_Encode", "ZImageVL_EmbeddingBlend"} <= set(node["inner"])
    assert {"CLIP", "CONDITIONING"} <= set(node["inputs"]) and node["outputs"] == ["CONDITIONING"]


CARDS_JS = """() => [...document.querySelectorAll("[role=dialog] [data-testid^='template-workflow-']")].map((c) => {
  const img = c.querySelector('img');
  return { id: c.dataset.testid, title: c.querySelector('h3')?.textContent.trim(),
           description: c.querySelector('p')?.textContent.trim(),
           image: img && img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null };
})"""


def test_template_browser_shows_the_packs_templates_with_titles_and_thumbnails(page):
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.wait_for("() => !!document.querySelector('[role=dialog] input[placeholder^=Search]')", timeout_s=30)
    # the pack's own category under Extensions, labelled by locales/en/main.json ("Z-Image VL", not the folder name)
    label = json.loads((REPO_ROOT / "locales" / "en" / "main.json").read_text())["templateWorkflows"]["category"][
        PACK_LINK_NAME]
    page.wait_for("""(m) => { const b = [...document.querySelectorAll('[role=dialog] nav [role=button]')]
        .find((e) => e.textContent.trim() === m); if (b) b.click(); return !!b; }""", label, timeout_s=30)
    names = ui_workflow_names()
    # the dialog shows a card's picture only while it is scrolled into view (and drops it outside): collect each
    # card as seen with its picture, bringing the next unseen one into view
    cards = page.wait_for(f"""() => {{ const seen = (window.__zvlCards ??= {{}});
        for (const x of ({CARDS_JS})()) if (x.image) seen[x.id] = x;
        const all = ({CARDS_JS})();
        const next = all.find((x) => !seen[x.id]);
        if (next) document.querySelector(`[data-testid="${{next.id}}"]`)?.scrollIntoView({{block: 'center'}});
        return all.length === {len(names)} && !next ? Object.values(seen) : null; }}""", timeout_s=30)
    page.screenshot(ARTIFACTS / "template_browser.png")
    page.press("Escape")
    assert sorted(c["id"] for c in cards) == [f"template-workflow-{n}" for n in names]
    # frontend 1.47 shows the file name as the title: readable, not snake_case
    assert sorted(c["title"] for c in cards) == names
    assert not [c["title"] for c in cards if template_title_problems(c["title"])]
    # ... and as the description ("-"/"_" made spaces): nothing else reaches it (README, "Templates")
    assert all(c["description"] == c["title"] for c in cards), cards
    # the card shows our 512² JPEG (the frontend fetches it and displays a blob: URL), not the placeholder
    assert all(c["image"] == [512, 512] for c in cards), cards


def test_style_template_runs_on_tiny_models_and_its_report_fits_its_node(page, browser_server):
    template = browser_server.get_json(f"/api/workflow_templates/{PACK_LINK_NAME}/{quote(STYLE)}.json")
    image = browser_server.stage_ref_image("test_scene.png", size=64)
    load(page, swap_ui_loaders_for_tiny(template, image=image))
    page.evaluate("""() => { const n = app.graph.nodes.find((n) => n.type === 'ZImageVL_Inspect');
        app.canvas.ds.scale = 1; app.canvas.ds.offset = [300 - n.pos[0], 120 - n.pos[1]]; app.canvas.setDirty(true, true); }""")
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    report = page.wait_for("""() => { const n = app.graph.nodes.find((n) => n.type === 'ZImageVL_Inspect');
        const w = n.widgets?.find((w) => w.name === 'zimage_vl_report'); return w && w.area.value; }""", timeout_s=300)
    page.evaluate("() => new Promise((r) => { app.canvas.setDirty(true, true); setTimeout(r, 500); })")
    geo = page.evaluate("""() => {
        const n = app.graph.nodes.find((n) => n.type === 'ZImageVL_Inspect');
        const ds = app.canvas.ds, c = app.canvasEl.getBoundingClientRect();
        const th = LiteGraph.NODE_TITLE_HEIGHT;
        const toScreen = (x, y) => [(x + ds.offset[0]) * ds.scale + c.x, (y + ds.offset[1]) * ds.scale + c.y];
        const [x0, y0] = toScreen(n.pos[0], n.pos[1] - th), [x1, y1] = toScreen(n.pos[0] + n.size[0], n.pos[1] + n.size[1]);
        const area = n.widgets.find((w) => w.name === 'zimage_vl_report').area;
        const r = area.getBoundingClientRect();
        return { node: [x0, y0, x1, y1], box: [r.left, r.top, r.right, r.bottom],
                 scroll: [area.scrollHeight, area.clientHeight], visible: getComputedStyle(area).display !== 'none' };
    }""")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "inspect_report_geometry.json").write_text(json.dumps(geo, indent=1))
    lines = report.count("\n") + 1
    assert geo["visible"] and lines >= 5, report
    (nx0, ny0, nx1, ny1), (bx0, by0, bx1, by1) = geo["node"], geo["box"]
    tol = 1.5
    assert nx0 - tol <= bx0 and bx1 <= nx1 + tol and ny0 - tol <= by0 and by1 <= ny1 + tol, geo
    assert by1 - by0 > 4 * 14, "the report box is too small to read"
    if lines <= 24:  # the default Report.MaxLines: every line shows without scrolling
        assert geo["scroll"][0] <= geo["scroll"][1] + 2, geo
