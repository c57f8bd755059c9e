// comfyui-zimage-vl frontend:
//  * a report box on the nodes that report text (VL Inspect's report, Save VL Embeddings' file name), the node
//    sized to its content after each run;
//  * a per-block weight editor on DiT Layer Injection (bars, drag to paint, presets) that writes the node's own
//    `block_weights` string and restores the bars from it (the node parses the string: API use needs no JS);
//  * editor defaults as frontend settings (Settings → Z-Image VL).
import { app } from "../../scripts/app.js";
import { formatBlockWeights, parseBlockWeights, presetBlocks } from "./block_weights_core.js";

const REPORTING_NODES = new Set(["ZImageVL_Inspect", "ZImageVL_SaveEmbeds",
  "ZImageVL_ColourSimilarity", "ZImageVL_ArtifactScore", "ZImageVL_SemanticSimilarity"]);
const INJECTION_NODE = "ZImageVL_DiTInjection";
const REPORT_WIDGET = "zimage_vl_report";
const EDITOR_WIDGET = "zimage_vl_block_editor";
const SETTING_BLOCKS = "ZImageVL.BlockEditor.Blocks";
const SETTING_STEP = "ZImageVL.BlockEditor.PaintStep";
const SETTING_REPORT_LINES = "ZImageVL.Report.MaxLines";
const REPORT_LINE_PX = 14; // font 11px × line-height 1.27
const REPORT_CHAR_PX = 6.7; // 11px monospace advance (measured in Chromium)
const editors = new Set(); // live editors, re-drawn when the block-count setting changes

function setting(id, fallback) {
  const value = app.extensionManager?.setting?.get?.(id) ?? app.ui?.settings?.getSettingValue?.(id);
  return value ?? fallback;
}

// --------------------------------------------------------------------------- report box

function reportBox(node) {
  const existing = node.widgets?.find((w) => w.name === REPORT_WIDGET);
  if (existing) return existing;
  const area = document.createElement("textarea");
  area.readOnly = true;
  area.spellcheck = false;
  area.wrap = "off";
  area.dataset.zimageVl = "report";
  area.style.cssText = `width:100%;height:100%;box-sizing:border-box;font-family:monospace;font-size:11px;` +
    `line-height:${REPORT_LINE_PX}px;opacity:0.85;resize:none;white-space:pre;overflow:auto;`;
  // addDOMWidget is the frontend's public way to put an element on a node; the box is output, not an input:
  // kept out of the prompt (options.serialize) and out of the saved widgets_values (widget.serialize).
  const widget = node.addDOMWidget(REPORT_WIDGET, "zimage_vl_report", area, {
    serialize: false,
    getValue: () => area.value,
    setValue: (v) => { area.value = v; },
    getMinHeight: () => widget.contentHeight ?? 40,
    getMaxHeight: () => widget.contentHeight ?? 40,
  });
  widget.serialize = false;
  widget.area = area;
  return widget;
}

/** Show the text in the node's report box and grow the node so the whole box lies inside it. */
function showReport(node, text) {
  const widget = reportBox(node);
  widget.area.value = text;
  const lines = text.split("\n");
  const shown = Math.min(lines.length, Math.max(3, Number(setting(SETTING_REPORT_LINES, 24))));
  widget.contentHeight = shown * REPORT_LINE_PX + 12 + 16; // + padding/border + a horizontal scrollbar
  const longest = Math.max(...lines.map((l) => l.length));
  const width = Math.min(900, Math.max(node.size[0], Math.ceil(longest * REPORT_CHAR_PX) + 40));
  const needed = node.computeSize([width, node.size[1]]);
  node.setSize([width, Math.max(needed[1], node.size[1])]);
  node.setDirtyCanvas?.(true, true);
}

// --------------------------------------------------------------------------- block-weight editor

const EDITOR_CSS = `
.zvl-bw{display:flex;flex-direction:column;gap:4px;height:100%;box-sizing:border-box;padding:2px 4px;
  font:11px sans-serif;color:var(--input-text,#ddd);user-select:none}
.zvl-bw-presets{display:flex;gap:3px}
.zvl-bw-presets button{flex:1;padding:1px 0;font:11px sans-serif;border-radius:4px;cursor:pointer;
  background:var(--comfy-input-bg,#222);color:inherit;border:1px solid var(--border-color,#555)}
.zvl-bw-bars{flex:1;display:flex;align-items:flex-end;gap:1px;min-height:50px;cursor:crosshair;touch-action:none;
  background:var(--comfy-input-bg,#222);border-radius:4px;padding:2px}
.zvl-bw-bar{flex:1;height:100%;display:flex;align-items:flex-end;position:relative}
.zvl-bw-bar>div{width:100%;background:#5b9bd5;border-radius:1px 1px 0 0}
.zvl-bw-bar.seg1>div{background:#6fbf73}.zvl-bw-bar.seg2>div{background:#d8a243}
.zvl-bw-bar.over>div{background:#e06c75}
.zvl-bw-status{opacity:.8;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.zvl-bw-status.error{color:#e06c75;opacity:1}
.zvl-bw.invalid .zvl-bw-bars{opacity:.4}`;

function installCss() {
  if (document.getElementById("zimage-vl-css")) return;
  const style = document.createElement("style");
  style.id = "zimage-vl-css";
  style.textContent = EDITOR_CSS;
  document.head.appendChild(style);
}

class BlockWeightEditor {
  constructor(node, textWidget) {
    this.node = node;
    this.text = textWidget;
    this.weights = [];
    this.synced = null; // the block_weights string the bars show
    this.root = document.createElement("div");
    this.root.className = "zvl-bw";
    this.root.dataset.zimageVl = "block-editor";
    const presets = document.createElement("div");
    presets.className = "zvl-bw-presets";
    for (const name of ["all", "early", "middle", "late", "clear"]) {
      const b = document.createElement("button");
      b.textContent = name;
      b.dataset.preset = name;
      b.title = name === "clear" ? "every block 0" : `weight 1 on the ${name} blocks (⌊3i/n⌋ thirds), 0 elsewhere`;
      b.addEventListener("click", (e) => { e.stopPropagation(); this.applyPreset(name); });
      presets.appendChild(b);
    }
    this.bars = document.createElement("div");
    this.bars.className = "zvl-bw-bars";
    this.status = document.createElement("div");
    this.status.className = "zvl-bw-status";
    this.root.append(presets, this.bars, this.status);
    this.bars.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    this.bars.addEventListener("pointermove", (e) => this.onPointerMove(e));
    this.bars.addEventListener("pointerup", (e) => this.onPointerUp(e));
    this.bars.addEventListener("pointercancel", (e) => this.onPointerUp(e));
  }

  get blockCount() {
    const n = Math.round(Number(setting(SETTING_BLOCKS, 30)));
    return Number.isFinite(n) && n >= 1 ? Math.min(n, 256) : 30;
  }

  /** Bars ← the node's block_weights string (on load, typing, undo, a changed block-count setting). */
  sync(force = false) {
    const spec = String(this.text.value ?? "");
    const n = this.blockCount;
    if (!force && spec === this.synced && this.weights.length === n) return;
    this.synced = spec;
    try {
      this.weights = parseBlockWeights(spec, n);
      this.error = null;
    } catch (e) {
      this.weights = new Array(n).fill(0);
      this.error = e.message;
    }
    this.render();
  }

  /** The node's block_weights string ← bars (what the node will parse, exactly). */
  commit(spec) {
    this.text.value = spec;
    this.text.callback?.(spec, app.canvas, this.node);
    this.synced = null;
    this.sync();
    this.node.setDirtyCanvas?.(true, true);
  }

  applyPreset(name) {
    // a preset is written as its own word: it means the same third of whatever model is connected
    this.commit(name === "clear" ? "all:0.0" : name);
  }

  render() {
    const n = this.weights.length;
    if (this.bars.childElementCount !== n) {
      this.bars.replaceChildren();
      for (let i = 0; i < n; i++) {
        const bar = document.createElement("div");
        bar.className = `zvl-bw-bar seg${Math.floor((3 * i) / n)}`;
        bar.dataset.block = String(i);
        bar.appendChild(document.createElement("div"));
        this.bars.appendChild(bar);
      }
    }
    this.weights.forEach((w, i) => {
      const bar = this.bars.children[i];
      bar.firstChild.style.height = `${Math.max(0, Math.min(1, w)) * 100}%`;
      bar.classList.toggle("over", w > 1 || w < 0);
      bar.dataset.weight = String(w);
      bar.title = `block ${i}: ${w}`;
    });
    this.root.classList.toggle("invalid", !!this.error);
    this.status.classList.toggle("error", !!this.error);
    this.status.textContent = this.error
      ? `${this.error} — change the text, or the block count in Settings → Z-Image VL`
      : `${n} blocks (Settings → Z-Image VL); drag to paint 0…1`;
  }

  hit(e) {
    const r = this.bars.getBoundingClientRect();
    const n = this.weights.length;
    const i = Math.max(0, Math.min(n - 1, Math.floor(((e.clientX - r.left) / r.width) * n)));
    const step = Math.max(0.001, Number(setting(SETTING_STEP, 0.05)));
    const raw = 1 - (e.clientY - r.top) / r.height;
    const w = Math.max(0, Math.min(1, Math.round(raw / step) * step));
    return [i, Math.round(w * 1e6) / 1e6];
  }

  paint(e) {
    const [i, w] = this.hit(e);
    const from = this.lastBlock ?? i;
    for (let k = Math.min(from, i); k <= Math.max(from, i); k++) this.weights[k] = w; // no gaps on fast drags
    this.lastBlock = i;
    this.error = null;
    this.render();
  }

  onPointerDown(e) {
    if (e.button !== 0) return;
    e.preventDefault();
    e.stopPropagation();
    this.bars.setPointerCapture?.(e.pointerId);
    this.painting = true;
    this.lastBlock = null;
    this.paint(e);
  }

  onPointerMove(e) {
    if (!this.painting) return;
    e.preventDefault();
    this.paint(e);
  }

  onPointerUp(e) {
    if (!this.painting) return;
    this.painting = false;
    this.lastBlock = null;
    this.bars.releasePointerCapture?.(e.pointerId);
    this.commit(formatBlockWeights(this.weights));
  }
}

/** Call onChange after every assignment to widget.value (typing, undo, paste, load, other extensions). */
function watchValue(widget, onChange) {
  let owner = widget;
  let desc;
  while (owner && !(desc = Object.getOwnPropertyDescriptor(owner, "value"))) owner = Object.getPrototypeOf(owner);
  if (!desc) return;
  let stored = desc.value;
  const get = desc.get ?? (() => stored);
  const set = desc.set ?? ((v) => { stored = v; });
  Object.defineProperty(widget, "value", {
    configurable: true,
    enumerable: true,
    get() { return get.call(this); },
    set(v) { set.call(this, v); onChange(); },
  });
}

function addBlockEditor(node) {
  const text = node.widgets?.find((w) => w.name === "block_weights");
  if (!text || node.widgets.some((w) => w.name === EDITOR_WIDGET)) return;
  installCss();
  const editor = new BlockWeightEditor(node, text);
  watchValue(text, () => editor.sync());
  // appended after every input widget and never serialized, so widgets_values keep the node's own order
  const widget = node.addDOMWidget(EDITOR_WIDGET, "zimage_vl_block_editor", editor.root, {
    serialize: false,
    getValue: () => text.value,
    setValue: () => {},
    getMinHeight: () => 110,
    getMaxHeight: () => 160,
    onDraw: () => editor.sync(), // a cheap check per frame besides the value watch
  });
  widget.serialize = false;
  widget.editor = editor;
  node.zimageVlEditor = editor;
  editors.add(editor);
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    editors.delete(editor);
    return onRemoved?.apply(this, arguments);
  };
  editor.sync(true);
  const size = node.computeSize();
  node.setSize([Math.max(node.size[0], size[0], 300), Math.max(node.size[1], size[1])]);
}

// --------------------------------------------------------------------------- extension

app.registerExtension({
  name: "comfyui-zimage-vl",
  settings: [
    {
      id: SETTING_BLOCKS,
      category: ["Z-Image VL", "Block weight editor", "Blocks"],
      name: "Blocks shown by the DiT Layer Injection weight editor",
      tooltip: "The editor cannot see the model; Z-Image Turbo has 30 main blocks. Presets split them into thirds by ⌊3i/n⌋.",
      type: "number",
      attrs: { min: 1, max: 256, step: 1 },
      defaultValue: 30,
      onChange: () => { for (const e of editors) e.sync(true); },
    },
    {
      id: SETTING_STEP,
      category: ["Z-Image VL", "Block weight editor", "PaintStep"],
      name: "Weight step when painting bars",
      type: "number",
      attrs: { min: 0.01, max: 0.5, step: 0.01 },
      defaultValue: 0.05,
    },
    {
      id: SETTING_REPORT_LINES,
      category: ["Z-Image VL", "Report box", "MaxLines"],
      name: "Report lines shown on a node before it scrolls",
      type: "number",
      attrs: { min: 3, max: 200, step: 1 },
      defaultValue: 24,
    },
  ],
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (REPORTING_NODES.has(nodeData.name)) {
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        onExecuted?.apply(this, arguments);
        const text = message?.text;
        if (text) showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
      };
    }
    if (nodeData.name === INJECTION_NODE) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        addBlockEditor(this);
        return r;
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const r = onConfigure?.apply(this, arguments);
        this.zimageVlEditor?.sync(true); // bars from the loaded string
        return r;
      };
    }
  },
});
