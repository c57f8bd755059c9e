"""Regenerate the pack's editor assets in the REAL editor (ComfyUI server + its frontend in headless Chromium):

* ``workflows/<name>.jpg``   template thumbnails: a screenshot of each UI workflow's graph (the template
                             browser shows ``/api/workflow_templates/<pack>/<name>.jpg``; ``<name>`` is also the
                             title the browser shows, see ``template_title_problems``);
* ``subgraphs/*.json``       the subgraph blueprints, built by the frontend itself (nodes linked, converted to a
                             subgraph, serialized the way "Save to library" does);
* ``web/docs/images/inspect_plot.png``  the picture on VL Inspect's help page (tiny random models: layout only).

One command (needs Chromium, node and playwright-core, which ``.ci/run`` installs):

    ~/.cache/comfyui-zimage-vl/venv/bin/python -m tools.editor_assets
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from tools import host_harness as harness
from tools.browser_bridge import Browser, skip_reason

REPO = harness.REPO_ROOT
SUBGRAPHS_DIR = REPO / "subgraphs"
DOCS_IMAGES = REPO / "web" / "docs" / "images"
THUMB_SIZE = 512
CATEGORY = "Z-Image VL"
USER_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.Persist": False, "Comfy.Release.Version": "99.0.0",
                 "Comfy.Release.Status": "skipped", "Comfy.Minimap.Visible": False}
READY_JS = """() => !!(window.app && app.graph && app.canvas && app.extensionManager?.setting
    && (app.extensions || []).some(e => e.name === 'comfyui-zimage-vl'))"""

# name -> inner nodes (type, widget values by name), the links between them, and the outer nodes whose links
# become the blueprint's inputs and outputs: (outer type, outer slot, inner index, inner input) for inputs,
# (inner index, inner slot, outer type, outer input) for outputs.
BLUEPRINTS = {
    "VL Style Reference": {
        "description": "Load Image → VL Encode → VL Embedding Blend: a reference image's look mixed into your "
                       "Z-Image prompt (alpha 0.3 slight, 0.5 strong). Connect the Qwen3-VL CLIP and the prompt's "
                       "conditioning; the output goes to the KSampler's positive.",
        "aliases": ["style reference", "reference image", "image prompt", "ipadapter", "redux", "style transfer"],
        "inner": [("LoadImage", {"image": "example.png"}), ("ZImageVL_Encode", {}), ("ZImageVL_EmbeddingBlend", {})],
        "links": [(0, 0, 1, "image"), (1, 0, 2, "vl_embeds")],
        "inputs": [("CLIPLoader", 0, 1, "clip"), ("CLIPTextEncode", 0, 2, "conditioning")],
        "outputs": [(2, 0, "KSampler", "positive")],
    },
    "VL Reference Injection": {
        "description": "VL Encode → DiT Layer Injection: the reference acts inside chosen Z-Image blocks "
                       "(IP-Adapter-like, the prompt stays untouched). Connect the reference image, the Qwen3-VL "
                       "CLIP and the Z-Image MODEL; the output MODEL goes to the KSampler.",
        "aliases": ["reference injection", "reference image", "ipadapter", "image prompt", "style transfer"],
        "inner": [("ZImageVL_Encode", {}), ("ZImageVL_DiTInjection", {})],
        "links": [(0, 0, 1, "vl_embeds")],
        "inputs": [("LoadImage", 0, 0, "image"), ("CLIPLoader", 0, 0, "clip"), ("ModelSamplingAuraFlow", 0, 1, "model")],
        "outputs": [(1, 0, "KSampler", "model")],
    },
}

# Frontend 1.47 (useWorkflowTemplatesStore.enhancedTemplates + useTemplateWorkflows) builds a custom-node template's
# card from its file name alone: title = name, description = name with "-" and "_" turned into spaces, thumbnail =
# apiURL(`/workflow_templates/<pack>/${name}`) + ".jpg" (the name is not URL-encoded); a name ending in ".app" opens
# in App mode. It reads no index.json, workflow `extra`, or locale key for them. So the file name is the title.
TEMPLATE_PREFIX = "VL "
TEMPLATE_TITLE_MAX = 32  # the card's title is one line (line-clamp-1) on a 15rem card
TEMPLATE_NAME_BAD_CHARS = {"_": "shows as a raw snake_case title", "-": "the description shows it as a space",
                           ".": "a dot suffix such as .app changes how the template opens",
                           "#": "breaks the unencoded thumbnail/workflow URL", "?": "breaks the unencoded URL",
                           "%": "breaks the unencoded URL", "/": "not a file name", "\\": "not a file name"}


def template_title_problems(name: str) -> list[str]:
    """Why the template file ``name`` would not show as a readable title in the template browser ([] = fine).
    Scheme: "VL " + Title Case words separated by single spaces, letters and digits only, at most 32 characters."""
    problems = [f"{c!r}: {why}" for c, why in TEMPLATE_NAME_BAD_CHARS.items() if c in name]
    if not name.startswith(TEMPLATE_PREFIX):
        problems.append(f"does not start with {TEMPLATE_PREFIX!r} (marks the pack's templates among the core ones)")
    if len(name) > TEMPLATE_TITLE_MAX:
        problems.append(f"{len(name)} characters, the card shows one line of about {TEMPLATE_TITLE_MAX}")
    words = name.split(" ")
    if any(not w for w in words):
        problems.append("leading, trailing or double spaces")
    lower = [w for w in words if w and not (w[0].isupper() or w[0].isdigit())]
    if lower:
        problems.append(f"words not in Title Case: {lower}")
    if not all(w.isalnum() for w in words if w):
        problems.append("only letters, digits and single spaces")
    return problems


BUILD_BLUEPRINT_JS = """(spec) => {
  app.graph.clear();
  const g = app.graph;
  const mk = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; g.add(n); return n; };
  const inner = spec.inner.map(([type, values], i) => {
    const n = mk(type, 400 + 450 * i, 0);
    for (const [k, v] of Object.entries(values)) { const w = n.widgets.find((w) => w.name === k); if (w) w.value = v; }
    return n;
  });
  const link = (a, aslot, b, bname) => { const s = b.findInputSlot(bname); if (s < 0) throw new Error(bname); a.connect(aslot, b, s); };
  for (const [a, aslot, b, bname] of spec.links) link(inner[a], aslot, inner[b], bname);
  spec.inputs.forEach(([type, slot, b, bname], i) => link(mk(type, 0, 300 * i), slot, inner[b], bname));
  spec.outputs.forEach(([a, slot, type, bname], i) => link(inner[a], slot, mk(type, 400 + 450 * inner.length, 300 * i), bname));
  const { node } = g.convertToSubgraph(new Set(inner));
  node.title = spec.name;
  const { nodes, subgraphs } = app.canvas._serializeItems([node]);
  return { nodes, subgraphs };
}"""


def build_blueprint(browser: Browser, name: str) -> dict:
    """The blueprint file content for ``name``, in the format the frontend's 'Save to library' writes."""
    spec = {"name": name, **BLUEPRINTS[name]}
    made = browser.evaluate(BUILD_BLUEPRINT_JS, spec)
    sub = made["subgraphs"][0]
    sub.update(name=name, description=spec["description"], category=CATEGORY)
    node = made["nodes"][0]
    return {"revision": 0, "last_node_id": node["id"], "last_link_id": 0, "nodes": [node], "links": [],
            "version": 0.4, "definitions": {"subgraphs": [sub]},
            "extra": {"BlueprintDescription": spec["description"], "BlueprintSearchAliases": spec["aliases"]}}


def write_blueprints(browser: Browser) -> list[Path]:
    SUBGRAPHS_DIR.mkdir(exist_ok=True)
    written = []
    for name in BLUEPRINTS:
        path = SUBGRAPHS_DIR / f"{name}.json"
        path.write_text(json.dumps(build_blueprint(browser, name), indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


FRAME_GROUPS_JS = """async (size) => {
  // focus mode hides the menus and panels; the view is then fitted to the workflow's groups (the Read-me
  // note beside them is left out), centred in a square canvas
  if (!document.body.classList.contains('zvl-focus')) {
    await app.extensionManager.command.execute('Workspace.ToggleFocusMode');
    document.body.classList.add('zvl-focus');
  }
  await new Promise((r) => setTimeout(r, 300));
  const boxes = app.graph.groups.map((g) => g._bounding ?? g.bounding);
  const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
  const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
  const r = app.canvasEl.getBoundingClientRect();
  const side = Math.min(r.width, r.height);
  const s = (0.96 * side) / Math.max(x1 - x0, y1 - y0);
  const ds = app.canvas.ds;
  ds.scale = s;
  ds.offset = [(r.width / s - (x1 - x0)) / 2 - x0, (r.height / s - (y1 - y0)) / 2 - y0];
  app.canvas.setDirty(true, true);
  await new Promise((r) => setTimeout(r, 500));
  return { x: r.x + (r.width - side) / 2, y: r.y + (r.height - side) / 2, width: side, height: side };
}"""


def write_thumbnails(browser: Browser, work: Path) -> list[Path]:
    """A square JPEG of each UI workflow's graph (its groups fitted to the view) next to the workflow."""
    from PIL import Image

    written = []
    browser.viewport(1500, 1500)
    for name in harness.ui_workflow_names():
        wf = harness.load_ui_workflow(name)
        browser.evaluate("async (wf) => { app.graph.clear(); await app.loadGraphData(wf, true, false); }", wf)
        box = browser.evaluate(FRAME_GROUPS_JS, THUMB_SIZE)
        shot = browser.screenshot(work / f"{name}.png", clip=box)
        with Image.open(shot) as im:
            out = harness.WORKFLOWS_DIR / f"{name}.jpg"
            im.convert("RGB").resize((THUMB_SIZE, THUMB_SIZE), Image.LANCZOS).save(out, "JPEG", quality=88)
        written.append(out)
    return written


def stage_model_names(server: harness.ComfyServer) -> None:
    """Empty files named like the workflows' models, so the editor shows the graphs without missing-model marks."""
    for name in harness.ui_workflow_names():
        for node in harness.load_ui_workflow(name)["nodes"]:
            for model in (node.get("properties") or {}).get("models", []):
                path = server.models_dir / model["directory"] / model["name"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
    server.stage_ref_image("test_scene.png", size=256, dest_name="example.png")


def write_inspect_picture(server: harness.ComfyServer) -> Path:
    """VL Inspect's plot from the shipped style workflow on tiny random models (shows the layout only)."""
    prompt = harness.swap_loaders_for_tiny(harness.load_api_workflow("VL Style Reference"))
    harness.set_image(prompt, server.stage_ref_image("test_scene.png", size=128))
    harness.set_inputs(prompt, "EmptySD3LatentImage", width=64, height=64)
    harness.set_inputs(prompt, "KSampler", steps=1)
    entry = server.submit(prompt)
    plot = server.output_files(entry, harness.node_of(prompt, "PreviewImage"), "images")[0]
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    out = DOCS_IMAGES / "inspect_plot.png"
    shutil.copyfile(plot, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["thumbnails", "blueprints", "docs"], action="append",
                    help="regenerate only these (default: all)")
    args = ap.parse_args(argv)
    only = set(args.only or ["thumbnails", "blueprints", "docs"])
    for name in harness.ui_workflow_names():
        for problem in template_title_problems(name):
            print(f"editor_assets: workflows/{name}.json: the template browser title: {problem}")
    reason = harness.HOST_SKIP_REASON or skip_reason()
    if reason:
        print(f"editor_assets: cannot run: {reason}")
        return 2
    with tempfile.TemporaryDirectory(prefix="zimage_vl_assets_") as tmp:
        work = Path(tmp)
        server = harness.ComfyServer(harness.comfyui_path(), work)
        server.prepare()
        stage_model_names(server)
        (server.user_dir / "default").mkdir(parents=True, exist_ok=True)
        (server.user_dir / "default" / "comfy.settings.json").write_text(json.dumps(USER_SETTINGS))
        server.start()
        browser = Browser()
        try:
            browser.goto(server.url + "/")
            browser.wait_for(READY_JS, timeout_s=120)
            written = []
            if "blueprints" in only:
                written += write_blueprints(browser)
            if "thumbnails" in only:
                written += write_thumbnails(browser, work)
            if "docs" in only:
                written.append(write_inspect_picture(server))
        finally:
            browser.close()
            server.stop()
    for p in written:
        print(f"editor_assets: wrote {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
