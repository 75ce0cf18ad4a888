// Save HyperLoRA as LoRA and Save HyperLoRA Identity: show on the node where the last run wrote its file, as the
// core save nodes show their images. The server sends it as the node's "saved_path" UI output (/history has it
// too); the line is drawn by a widget that is neither saved in the workflow nor sent with the prompt.
import { app } from "../../../scripts/app.js";

const SAVERS = new Set(["SaveHyperLoRA", "SaveHyperLoRAIdentity"]);
const EMPTY = "saved to: (runs of this node show the file here)";

app.registerExtension({
  name: "HyperLoRA.SavedPath",
  nodeCreated(node) {
    if (!SAVERS.has(node.comfyClass)) return;
    const line = node.addCustomWidget({
      name: "saved_to", type: "hyperlora_saved_path", value: "", serialize: false, options: { serialize: false },
      computeSize: (width) => [width, 22],
      draw(ctx, _node, width, y, height) {
        ctx.save();
        ctx.font = "12px sans-serif";
        ctx.fillStyle = this.value ? "#9d9" : "#888";
        ctx.textAlign = "left";
        ctx.textBaseline = "middle";
        const text = this.value ? `saved to: ${this.value}` : EMPTY;
        let shown = text;
        while (shown.length > 12 && ctx.measureText(shown).width > width - 24) shown = "…" + shown.slice(2);
        ctx.fillText(shown, 12, y + height / 2);
        ctx.restore();
      },
    });
    node.setSize([node.size[0], node.computeSize()[1]]);
    const executed = node.onExecuted;
    node.onExecuted = function (output) {
      executed?.apply(this, arguments);
      const path = output?.saved_path?.[0] ?? output?.text?.[0];
      if (path) {
        line.value = String(path);
        this.graph?.setDirtyCanvas(true, true);
      }
    };
  },
});
