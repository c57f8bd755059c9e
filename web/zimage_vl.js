// comfyui-zimage-vl frontend: show the text a node reports (VL Inspect's report, Save VL Embeddings' file name)
// in a read-only box on the node after it runs.
import { app } from "../../scripts/app.js";

const REPORTING_NODES = new Set(["ZImageVL_Inspect", "ZImageVL_SaveEmbeds",
  "ZImageVL_ColourSimilarity", "ZImageVL_ArtifactScore", "ZImageVL_SemanticSimilarity"]);
const WIDGET_NAME = "zimage_vl_report";

function reportBox(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (existing) return existing;
  const area = document.createElement("textarea");
  area.readOnly = true;
  area.spellcheck = false;
  area.style.cssText = "width:100%;min-height:120px;font-family:monospace;font-size:11px;opacity:0.85;resize:vertical;";
  // addDOMWidget is the frontend's public way to put an element on a node; serialize:false keeps
  // the report out of saved workflows (it is output, not an input).
  const widget = node.addDOMWidget(WIDGET_NAME, "zimage_vl_report", area, {
    serialize: false,
    getValue: () => area.value,
    setValue: (v) => { area.value = v; },
  });
  widget.area = area;
  return widget;
}

app.registerExtension({
  name: "comfyui-zimage-vl.reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORTING_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text) return;
      const widget = reportBox(this);
      widget.area.value = Array.isArray(text) ? text.join("\n") : String(text);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
