// Drives Debian's chromium (playwright-core) against a running ComfyUI for tests/host/test_browser.py.
// Usage: node driver.cjs <config.json>; config: {url, chromium, workflows: [paths], screenshot: {workflow, path},
// guard: true, words, tmp}. Prints one JSON object with what it saw; the Python test makes the assertions.
const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require("playwright-core");

const ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
  "--no-first-run", "--disable-quic", "--disable-sync"];
const VIEWPORT = { width: 1280, height: 800 };

// In the page: record every dialog the app opens and every toast it shows (through their pinia stores).
function watchStores() {
  const pinia = document.querySelector("#vue-app").__vue_app__.config.globalProperties.$pinia;
  window.__seen = { dialogs: [], toasts: [] };
  pinia._s.get("dialog").$onAction(({ name, args }) => {
    if (name === "showDialog") window.__seen.dialogs.push({ key: args[0]?.key, title: args[0]?.title ?? null });
  });
  pinia._s.get("toast").$onAction(({ name, args }) => {
    if (name === "add" || name === "addAlert") window.__seen.toasts.push({ name, message: JSON.stringify(args[0]) });
  });
  return pinia._s.get("dialog").dialogStack.map((d) => d.key);
}

// In the page: ComfyUI without its optional `spandrel` lacks UpscaleModelLoader, and the frontend (1.27.10) then
// throws in modelToNodeStore.getRegisteredNodeTypes ("reading 'name'") whenever it builds a model combo, so
// CheckpointLoaderSimple, ControlNetLoader, LoraLoader ... cannot even be created. Drop the providers whose
// node is missing, as a complete ComfyUI would never have them. Returns the model folders it fixed.
function pruneMissingModelProviders() {
  const pinia = document.querySelector("#vue-app").__vue_app__.config.globalProperties.$pinia;
  const store = pinia._s.get("modelToNode");
  if (!store) return [];
  store.registerDefaults();
  const pruned = [];
  for (const [folder, providers] of Object.entries(store.modelToNodeMap)) {
    const kept = providers.filter((p) => p.nodeDef);
    if (kept.length !== providers.length) {
      pruned.push(folder);
      store.modelToNodeMap[folder] = kept;
    }
  }
  return pruned;
}

// In the page: a plain canvas for the docs image: full detail at any zoom, no fps counter, minimap or tab bar.
async function plainCanvasSettings() {
  const pinia = document.querySelector("#vue-app").__vue_app__.config.globalProperties.$pinia;
  const settings = pinia._s.get("setting");
  for (const [id, value] of Object.entries({ "LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.Graph.CanvasInfo": false,
    "Comfy.Minimap.Visible": false, "Comfy.Workflow.WorkflowTabsPosition": "Sidebar" })) {
    await settings.set(id, value);
  }
}

function seen() {
  const pinia = document.querySelector("#vue-app").__vue_app__.config.globalProperties.$pinia;
  const errorToasts = [...document.querySelectorAll(".p-toast-message-error")].map((e) => e.innerText);
  return { ...window.__seen, open: pinia._s.get("dialog").dialogStack.map((d) => d.key), errorToasts };
}

// In the page: the two steps every graph built below is made of, kept on window.__graph (page.evaluate sends a
// function's own text, so the builders cannot share a helper by closure): add a node of a type at a position with
// widget values, and link an output slot of one node to a named input of another.
function installGraphTools() {
  const { app } = window.comfyAPI.app;
  window.__graph = {
    add(type, pos, values = {}) {
      const node = LiteGraph.createNode(type);
      node.pos = pos;
      app.graph.add(node);
      for (const [name, value] of Object.entries(values)) node.widgets.find((w) => w.name === name).value = value;
      return node;
    },
    link: (a, out, b, input) => a.connect(out, b, b.inputs.findIndex((i) => i.name === input)),
  };
}

// In the page: build the guard's test graph. CheckpointLoaderSimple -> ApplyHyperLoRA -> KSampler, whose
// positive comes from a prompt through ControlNetApplyAdvanced (which also carries the negative), and
// HyperLoRAHook -> ConditioningSetProperties <- a second prompt.
function buildGuardGraph({ positive, negative, hookPrompt }) {
  const { app } = window.comfyAPI.app;
  app.graph.clear();
  const { add, link } = window.__graph;
  const ckpt = add("CheckpointLoaderSimple", [0, 0]);
  const loader = add("LoadHyperLoRA", [0, 250]);
  const image = add("LoadImage", [0, 450]);
  const identity = add("HyperLoRAFromImage", [350, 400]);
  const apply = add("ApplyHyperLoRA", [700, 0]);
  const pos = add("CLIPTextEncode", [350, 700], { text: positive });
  const neg = add("CLIPTextEncode", [350, 950], { text: negative });
  const cn = add("ControlNetLoader", [350, 1200]);
  const cnApply = add("ControlNetApplyAdvanced", [800, 700]);
  const sampler = add("KSampler", [1200, 0]);
  const hook = add("HyperLoRAHook", [700, 1200]);
  const hookText = add("CLIPTextEncode", [700, 1500], { text: hookPrompt });
  const setProps = add("ConditioningSetProperties", [1200, 1200]);
  link(ckpt, 0, apply, "model"); link(loader, 0, apply, "hyper_lora"); link(loader, 0, identity, "hyper_lora");
  link(image, 0, identity, "image"); link(identity, 0, apply, "identity");
  link(ckpt, 1, pos, "clip"); link(ckpt, 1, neg, "clip"); link(ckpt, 1, hookText, "clip");
  link(pos, 0, cnApply, "positive"); link(neg, 0, cnApply, "negative"); link(cn, 0, cnApply, "control_net");
  link(image, 0, cnApply, "image");
  link(apply, 0, sampler, "model"); link(cnApply, 0, sampler, "positive"); link(cnApply, 1, sampler, "negative");
  link(loader, 0, hook, "hyper_lora"); link(identity, 0, hook, "identity");
  link(hookText, 0, setProps, "cond_NEW"); link(hook, 0, setProps, "hooks");
  app.graph.setDirtyCanvas(true, true);
  return { apply: apply.id, hook: hook.id, pos: pos.id, neg: neg.id, hookText: hookText.id };
}

// In the page: the guard's state on a node: its button (a title-bar button; a widget in older versions of the
// guard), where its centre is on the screen, and what the page shows there (the canvas, or an element on top).
function guardState(id) {
  const { app } = window.comfyAPI.app;
  const node = app.graph.getNodeById(id);
  const titleButton = node.title_buttons?.find((b) => b.name === "insert trigger words");
  const widget = node.widgets?.find((w) => w.name === "insert trigger words");
  let shown = false;
  let centre = [node.pos[0] + node.size[0] / 2, node.pos[1]];
  if (titleButton) {
    const [x, y, w, h] = titleButton._last_area;
    shown = titleButton.visible;
    centre = [node.pos[0] + x + w / 2, node.pos[1] + y + h / 2];
  } else if (widget) {
    shown = !widget.hidden;
    centre = [node.pos[0] + node.size[0] / 2, node.pos[1] + widget.y + LiteGraph.NODE_WIDGET_HEIGHT / 2];
  }
  const rect = app.canvas.canvas.getBoundingClientRect();
  const [x, y] = app.canvas.ds.convertOffsetToCanvas(centre);
  const dpr = window.devicePixelRatio || 1;
  const screen = { x: rect.left + x / dpr, y: rect.top + y / dpr };
  const top = document.elementFromPoint(screen.x, screen.y);
  const covered = top && top !== app.canvas.canvas
    ? (top.closest(".selection-toolbox") ? "selection toolbox" : `${top.tagName}.${top.className}`) : null;
  return { shown, ...screen, covered };
}

const text = (id) => window.comfyAPI.app.app.graph.getNodeById(id).widgets.find((w) => w.name === "text").value;

async function settle(page) {
  // a few frames, so the canvas draws and the guard (which checks while drawing) runs
  await page.evaluate(() => window.comfyAPI.app.app.graph.setDirtyCanvas(true, true));
  await page.waitForTimeout(450);
  await page.evaluate(() => window.comfyAPI.app.app.graph.setDirtyCanvas(true, true));
  await page.waitForTimeout(100);
}

async function clickGuard(page, id, screenshot) {
  // bring the node into view (the guard checks while the node is drawn), then click its button with the mouse
  await page.evaluate((n) => window.comfyAPI.app.app.canvas.centerOnNode(window.comfyAPI.app.app.graph.getNodeById(n)), id);
  await settle(page);
  if (screenshot) await page.screenshot({ path: screenshot });
  const before = await page.evaluate(guardState, id);
  await page.mouse.click(before.x, before.y);
  await settle(page);
  if (screenshot) await page.screenshot({ path: screenshot.replace(".png", "_fixed.png") });
  return { before: before.shown, after: (await page.evaluate(guardState, id)).shown };
}

async function checkGuard(page, config, result) {
  const missing = await page.evaluate(buildGuardGraph, {
    positive: "portrait photo of a woman, studio light", negative: "blurry, lowres", hookPrompt: "a man on the left",
  });
  const apply = await clickGuard(page, missing.apply, path.join(config.tmp, "guard_missing.png"));
  const texts = async () => ({ positive: await page.evaluate(text, missing.pos),
    negative: await page.evaluate(text, missing.neg), hookPrompt: await page.evaluate(text, missing.hookText) });
  const afterApply = await texts();
  const hook = await clickGuard(page, missing.hook);
  result.guard = { missing: { apply, hook, afterApply, afterHook: await texts() } };
  // the words already there: no guard from the start
  const present = await page.evaluate(buildGuardGraph, {
    positive: `${config.words}, portrait photo of a woman`, negative: "blurry", hookPrompt: `${config.words}, a man`,
  });
  const shown = async (id) => {
    await page.evaluate((n) => window.comfyAPI.app.app.canvas.centerOnNode(window.comfyAPI.app.app.graph.getNodeById(n)), id);
    await settle(page);
    return (await page.evaluate(guardState, id)).shown;
  };
  result.guard.present = { apply: await shown(present.apply), hook: await shown(present.hook) };
  // the API prompt and the saved workflow carry nothing of the guard
  result.guard.serialized = await page.evaluate(async (id) => {
    const { app } = window.comfyAPI.app;
    const { output, workflow } = await app.graphToPrompt();
    return { inputs: Object.keys(output[String(id)].inputs),
      widgets_values: workflow.nodes.find((n) => n.id === id).widgets_values };
  }, present.apply);
  return page.evaluate(() => window.comfyAPI.app.app.graph.serialize());
}

// The portrait example as it opens, its prompt without the trigger words, and that prompt selected with a mouse
// click (its selection toolbox shows above it, between the prompt and Apply HyperLoRA): the guard's button must
// stay visible and clickable.
async function checkGuardWithPromptSelected(page, config) {
  const graph = JSON.parse(fs.readFileSync(config.guardSelected.workflow, "utf8"));
  await page.evaluate((g) => window.comfyAPI.app.app.loadGraphData(g), graph);
  const ids = await page.evaluate((words) => {
    const { app } = window.comfyAPI.app;
    const prompt = app.graph.nodes.find((n) => n.type === "CLIPTextEncode"
      && String(n.widgets.find((w) => w.name === "text").value).includes(words));
    prompt.widgets.find((w) => w.name === "text").value = "a close-up portrait photo of a person";
    app.canvas.centerOnNode(prompt);
    return { prompt: prompt.id, apply: app.graph.nodes.find((n) => n.type === "ApplyHyperLoRA").id };
  }, config.words);
  await settle(page);
  const title = await page.evaluate((id) => {
    // the prompt's title bar, left of centre, on the screen
    const { app } = window.comfyAPI.app;
    const node = app.graph.getNodeById(id);
    const rect = app.canvas.canvas.getBoundingClientRect();
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + 60, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
    const dpr = window.devicePixelRatio || 1;
    return { x: rect.left + x / dpr, y: rect.top + y / dpr };
  }, ids.prompt);
  await page.mouse.click(title.x, title.y);
  await settle(page);
  await page.waitForTimeout(300); // the toolbox slides in
  const before = await page.evaluate(guardState, ids.apply);
  const selected = await page.evaluate((id) => Object.keys(window.comfyAPI.app.app.canvas.selected_nodes ?? {})
    .map(Number).includes(id), ids.prompt);
  const toolbox = await page.evaluate(() => {
    const panel = document.querySelector(".selection-toolbox");
    if (!panel) return null;
    const r = panel.getBoundingClientRect();
    return { x: r.left, y: r.top, width: r.width, height: r.height };
  });
  await page.screenshot({ path: path.join(config.tmp, "guard_prompt_selected.png") });
  await page.mouse.click(before.x, before.y);
  await settle(page);
  const after = await page.evaluate(guardState, ids.apply);
  return { selected, toolbox, before, after: after.shown, prompt: await page.evaluate(text, ids.prompt) };
}

// A save graph built in the page and queued from the UI (app.queuePrompt, as the Queue button does); the two save
// nodes must then show where they wrote. Returns what each shows, or a timeout.
function buildSaveGraph({ checkpoint, analyzer }) {
  const { app } = window.comfyAPI.app;
  app.graph.clear();
  const { add, link } = window.__graph;
  const loader = add("LoadHyperLoRA", [0, 0], { checkpoint, face_analyzer: analyzer, provider: "cpu", dtype: "fp32" });
  const photo = add("HLTestFaceImage", [0, 250], { seed: 3 });
  const identity = add("HyperLoRAFromImage", [350, 0]);
  const saveLora = add("SaveHyperLoRA", [750, 0], { filename_prefix: "browser/me" });
  const saveIdentity = add("SaveHyperLoRAIdentity", [750, 250], { filename_prefix: "browser_me" });
  link(loader, 0, identity, "hyper_lora"); link(photo, 0, identity, "image");
  link(loader, 0, saveLora, "hyper_lora"); link(identity, 0, saveLora, "identity");
  link(identity, 0, saveIdentity, "identity");
  app.canvas.centerOnNode(saveLora);
  return { saveLora: saveLora.id, saveIdentity: saveIdentity.id };
}

async function checkSavedPath(page, config) {
  const ids = await page.evaluate(buildSaveGraph, config.saves);
  const shown = (id) => window.comfyAPI.app.app.graph.getNodeById(id).widgets.find((w) => w.name === "saved_to")
    ?.value ?? null;
  const before = { lora: await page.evaluate(shown, ids.saveLora), identity: await page.evaluate(shown, ids.saveIdentity) };
  await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
  try {
    await page.waitForFunction((n) => ["saveLora", "saveIdentity"].every((k) => window.comfyAPI.app.app.graph
      .getNodeById(n[k]).widgets.find((w) => w.name === "saved_to")?.value), ids, { timeout: 90000 });
  } catch (e) {
    return { before, error: String(e).slice(0, 300) };
  }
  await settle(page);
  await page.screenshot({ path: path.join(config.tmp, "saved_path.png") });
  const after = { lora: await page.evaluate(shown, ids.saveLora), identity: await page.evaluate(shown, ids.saveIdentity) };
  const workflow = await page.evaluate((id) => window.comfyAPI.app.app.graph.serialize().nodes
    .find((n) => n.id === id).widgets_values, ids.saveLora);
  return { before, after, widgetsValues: workflow };
}

// The template browser, opened as a user does (the Browse Templates command), on this package's category:
// each card's title, description and whether its thumbnail loaded.
async function checkTemplates(page, config) {
  await page.evaluate(() => {
    const pinia = document.querySelector("#vue-app").__vue_app__.config.globalProperties.$pinia;
    return pinia._s.get("command").execute("Comfy.BrowseTemplates");
  });
  await page.waitForSelector('[data-testid="template-workflows-content"]', { timeout: 20000 });
  await page.getByRole("option", { name: config.templates.category, exact: true }).click();
  await page.waitForSelector(`[data-testid^="template-workflow-"]`, { timeout: 20000 });
  await page.waitForTimeout(500);
  const names = await page.evaluate(() => [...document.querySelectorAll('[data-testid^="template-workflow-"]')]
    .map((card) => card.getAttribute("data-testid").slice("template-workflow-".length)));
  const cards = [];
  for (const name of names) {
    const card = page.locator(`[data-testid="template-workflow-${name}"]`);
    await card.scrollIntoViewIfNeeded();
    await page.waitForFunction((n) => {
      const img = document.querySelector(`[data-testid="template-workflow-${n}"] img`);
      return img && img.complete && img.naturalWidth > 0;
    }, name, { timeout: 15000 }).catch(() => null);
    cards.push(await card.evaluate((el) => {
      const img = el.querySelector("img");
      return { title: el.querySelector("h3")?.innerText ?? null, description: el.querySelector("p")?.innerText ?? null,
        thumbnail: img ? { width: img.naturalWidth, height: img.naturalHeight, src: img.src } : null };
    }));
  }
  await page.screenshot({ path: path.join(config.tmp, "templates.png") });
  const category = await page.evaluate(() => [...document.querySelectorAll('[role="option"]')].map((o) => o.innerText));
  await page.keyboard.press("Escape");
  await page.waitForTimeout(300);
  return { cards, categories: category };
}

// The frontend's own node search (what the search box shows, in order) for each query: node ids, best first.
function searchNodes(queries) {
  const pinia = document.querySelector("#vue-app").__vue_app__.config.globalProperties.$pinia;
  const service = pinia._s.get("nodeDef").nodeSearchService;
  return Object.fromEntries(queries.map((q) => [q, service.searchNode(q).slice(0, 12).map((d) => d.name)]));
}

async function loadWorkflow(page, graph, screenshot) {
  // load through the frontend as a user's drop would, then report what the app opened, showed and drew
  await page.evaluate(() => { window.__seen = { dialogs: [], toasts: [] }; });
  await page.evaluate((g) => window.comfyAPI.app.app.loadGraphData(g), graph);
  await settle(page);
  const state = {
    ...(await page.evaluate(seen)),
    nodes: await page.evaluate(() => window.comfyAPI.app.app.graph.nodes.length),
    unknownTypes: await page.evaluate(() => window.comfyAPI.app.app.graph.nodes
      .filter((n) => !(n.type in LiteGraph.registered_node_types)).map((n) => n.type)),
    guardShown: await page.evaluate(() => window.comfyAPI.app.app.graph.nodes
      .filter((n) => n.title_buttons?.some((b) => b.name === "insert trigger words" && b.visible)
        || n.widgets?.some((w) => w.name === "insert trigger words" && !w.hidden)).map((n) => n.type)),
  };
  if (screenshot) {
    // the graph alone, larger: no menus, side bar or canvas buttons
    await page.setViewportSize({ width: 1600, height: 1000 });
    const chrome = await page.addStyleTag({ content: "#comfyui-body-top, #comfyui-body-left, .minimap-main-container, "
      + ".graph-canvas-container .p-buttongroup { display: none !important; }" });
    await page.waitForTimeout(200);
    await page.evaluate(() => {
      const { app } = window.comfyAPI.app;
      const rects = app.graph.nodes.map((n) => n.boundingRect);
      const x = Math.min(...rects.map((r) => r[0])), y = Math.min(...rects.map((r) => r[1]));
      const w = Math.max(...rects.map((r) => r[0] + r[2])) - x, h = Math.max(...rects.map((r) => r[1] + r[3])) - y;
      app.canvas.ds.fitToBounds([x, y - 40, w, h + 40], { zoom: 0.97 });
      app.canvas.setDirty(true, true);
    });
    await settle(page);
    await page.screenshot({ path: screenshot });
    await chrome.evaluate((style) => style.remove());
    await page.setViewportSize(VIEWPORT);
  }
  return state;
}

async function main() {
  const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const result = { tmp: config.tmp, pageErrors: [], consoleErrors: [], startupErrors: [], workflows: {} };
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "hyperlora-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: config.chromium, headless: true, args: ARGS, viewport: VIEWPORT,
  });
  try {
    const page = context.pages()[0] ?? (await context.newPage());
    let ready = false;
    page.on("pageerror", (e) => (ready ? result.pageErrors : result.startupErrors).push(e.message));
    page.on("console", (m) => {
      if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) {
        (ready ? result.consoleErrors : result.startupErrors).push(m.text().slice(0, 400));
      }
    });
    // a returning user: the first visit would load a blank graph and open the template browser, asynchronously
    const tutorial = await fetch(new URL("api/settings/Comfy.TutorialCompleted", config.url), { method: "POST",
      body: "true", headers: { "Content-Type": "application/json" } });
    if (!tutorial.ok) throw new Error(`POST settings: HTTP ${tutorial.status}`);
    const started = Date.now();
    await page.goto(config.url);
    // ready: our node types and extension are registered and the start-up default graph is on the canvas
    await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph?.nodes.length && window.LiteGraph
      ?.registered_node_types?.ApplyHyperLoRA && window.comfyAPI.app.app.extensions
      ?.some((e) => e.name === "HyperLoRA.TriggerWordGuard"), null, { timeout: 30000 });
    result.readyMs = Date.now() - started;
    await page.waitForTimeout(500);
    result.prunedModelProviders = await page.evaluate(pruneMissingModelProviders);
    if (config.screenshot) await page.evaluate(plainCanvasSettings);
    result.openAtStart = await page.evaluate(watchStores);
    await page.evaluate(installGraphTools);
    ready = true;

    for (const file of config.workflows) {
      const graph = JSON.parse(fs.readFileSync(file, "utf8"));
      const shot = config.screenshot?.workflow === file ? config.screenshot.path : null;
      result.workflows[file] = await loadWorkflow(page, graph, shot);
    }
    if (config.search) result.search = await page.evaluate(searchNodes, config.search);
    if (config.templates) result.templates = await checkTemplates(page, config);
    if (config.guardSelected) result.guardSelected = await checkGuardWithPromptSelected(page, config);
    if (config.saves) result.saves = await checkSavedPath(page, config);
    if (config.guard) {
      const built = await checkGuard(page, config, result);
      // with no example workflows yet, the guard's own graph (words present) stands in for one
      if (!config.workflows.length) {
        result.workflows["built: guard graph"] = await loadWorkflow(page, built, config.screenshot?.path);
      }
    }
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((e) => { process.stderr.write(String(e?.stack ?? e) + "\n"); process.exit(1); });
