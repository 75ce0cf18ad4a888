// HyperLoRA trigger-word guard. An identity does nothing unless the prompt holds "fcsks fxhks fhyks".
// When Apply HyperLoRA (through the patched MODEL) or HyperLoRA Identity Hook (through its HOOKS) reaches a
// sampler or conditioning whose positive prompt lacks them, the node shows a warning and an
// "insert trigger words" button that puts them in front of that prompt.
// The button sits in the node's own title bar: a widget at the bottom of the node was hidden under the selection
// toolbox of a prompt node placed just below it, exactly while that prompt was selected for editing.
// Nothing else changes: the button is neither saved in the workflow nor sent with the prompt.
import { app } from "../../../scripts/app.js";

export const TRIGGER = "fcsks fxhks fhyks";
const GUARDED = { ApplyHyperLoRA: "MODEL", HyperLoRAHook: "HOOKS" }; // node -> the output type to follow
const TEXT_WIDGETS = ["text", "text_g", "text_l"]; // CLIPTextEncode, CLIPTextEncodeSDXL
const CHECK_MS = 300;

function conditioningSlots(node) {
  // the CONDITIONING inputs to check: positive ones where a node has them (KSampler, CFGGuider), else all
  const slots = (node.inputs ?? []).flatMap((input, slot) => (input.type === "CONDITIONING" ? [slot] : []));
  const positive = slots.filter((slot) => node.inputs[slot].name.startsWith("positive"));
  return positive.length ? positive : slots;
}

function prompts(node, slot, seen = new Set()) {
  // {node, widget} of the text prompts feeding input `slot`, walking up through conditioning nodes
  const link = node.getInputLink(slot);
  const source = link && node.graph.getNodeById(link.origin_id);
  if (!source || seen.has(source.id)) return [];
  seen.add(source.id);
  const texts = (source.widgets ?? []).filter((w) => TEXT_WIDGETS.includes(w.name));
  if (texts.length) return texts.map((widget) => ({ node: source, widget }));
  // ControlNetApplyAdvanced and the like pass positive and negative side by side: follow the same name only
  const name = source.outputs?.[link.origin_slot]?.name;
  const same = (source.inputs ?? []).findIndex((input) => input.name === name && input.type === "CONDITIONING");
  const slots = same >= 0 ? [same] : conditioningSlots(source);
  return slots.flatMap((s) => prompts(source, s, seen));
}

function targets(node, type, seen = new Set()) {
  // nodes taking conditioning that the `type` outputs of `node` reach, through nodes passing that type on
  return (node.outputs ?? []).flatMap((output, slot) => (output.type === type ? node.getOutputNodes(slot) ?? [] : []))
    .flatMap((next) => {
      if (seen.has(next.id)) return [];
      seen.add(next.id);
      return [...(conditioningSlots(next).length ? [next] : []), ...targets(next, type, seen)];
    });
}

function hasTrigger({ node, widget }) {
  // a prompt fed through a link cannot be read here: give it the benefit of the doubt
  return node.getSlotFromWidget?.(widget)?.link != null || String(widget.value ?? "").includes(TRIGGER);
}

export function missingPrompts(node) {
  // for each reached sampler/conditioning whose prompts all lack the words: the prompt to fix (its first)
  return targets(node, GUARDED[node.comfyClass])
    .map((target) => conditioningSlots(target).flatMap((slot) => prompts(target, slot)))
    .filter((found) => found.length && !found.some(hasTrigger))
    .map((found) => found[0]);
}

function insertTrigger(node) {
  for (const { widget } of missingPrompts(node)) {
    const text = String(widget.value ?? "").trim();
    widget.value = text ? `${TRIGGER}, ${text}` : TRIGGER;
    widget.callback?.(widget.value);
  }
  node.hyperloraCheck();
  node.graph.setDirtyCanvas(true, true);
}

const LABEL = "⚠ insert trigger words";
const BUTTON_FONT = "bold 11px sans-serif";

function addGuardButton(node) {
  // a title-bar button (LGraphButton): drawn here as a red pill; hidden while its text is empty
  const button = node.addTitleButton({ name: "insert trigger words", text: "", fontSize: 11, height: 18 });
  button.getWidth = function (ctx) {
    if (!this.visible) return 0;
    const { font } = ctx;
    ctx.font = BUTTON_FONT;
    const width = ctx.measureText(this.text).width + 12;
    ctx.font = font;
    return width;
  };
  button.draw = function (ctx, x, y) {
    if (!this.visible) return;
    const width = this.getWidth(ctx);
    this._last_area[0] = x - 4;
    this._last_area[1] = y;
    this._last_area[2] = width;
    this._last_area[3] = this.height;
    ctx.save();
    ctx.fillStyle = "#b33";
    ctx.beginPath();
    ctx.roundRect(x - 4, y, width, this.height, 5);
    ctx.fill();
    ctx.font = BUTTON_FONT;
    ctx.fillStyle = "#fff";
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillText(this.text, x + 2, y + this.height / 2 + 1);
    ctx.restore();
  };
  return button;
}

app.registerExtension({
  name: "HyperLoRA.TriggerWordGuard",
  nodeCreated(node) {
    if (!(node.comfyClass in GUARDED)) return;
    const button = addGuardButton(node);
    const click = node.onTitleButtonClick;
    node.onTitleButtonClick = function (clicked, canvas) {
      if (clicked === button) insertTrigger(node);
      else click?.apply(this, arguments);
    };
    let checked = 0;
    node.hyperloraCheck = () => {
      checked = Date.now();
      button.text = missingPrompts(node).length ? LABEL : "";
    };
    const draw = node.onDrawForeground;
    node.onDrawForeground = function (ctx) {
      const result = draw?.apply(this, arguments);
      if (Date.now() - checked > CHECK_MS && this.graph) this.hyperloraCheck();
      if (button.visible) {
        const message = `⚠ the prompt lacks "${TRIGGER}": the identity has no effect`;
        const y = -LiteGraph.NODE_TITLE_HEIGHT - 24;
        ctx.save();
        ctx.font = "12px sans-serif";
        ctx.fillStyle = "#b33";
        ctx.fillRect(0, y, Math.max(this.size[0], ctx.measureText(message).width + 12), 20);
        ctx.fillStyle = "#fff";
        ctx.textAlign = "left";
        ctx.fillText(message, 6, y + 14);
        ctx.restore();
      }
      return result;
    };
  },
});
