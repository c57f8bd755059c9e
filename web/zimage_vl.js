// comfyui-zimage-vl frontend: show the text a node reports (VL Inspect's report, Save VL Embeddings' file name)
// in a read-only box on the node after it runs.
import { app } from "../../scripts/app.js";

const REPORTING_NODES = new Set(["ZImageVL_Inspect", "ZImageVL_SaveEmbeds"]);
const WIDGET_NAME = "zimage_vl_report";

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    widget = node.addWidget("text", WIDGET_NAME, "", () => {}, { multiline: true, serialize: false });
    const area = widget.element ?? widget.inputEl;
    if (area) {
      area.readOnly = true;
      area.style.fontFamily = "monospace";
      area.style.opacity = "0.85";
    }
    widget.serialize = false;
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "comfyui-zimage-vl.reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORTING_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text) showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
