// A layer: its first N channels rendered as ONE batched job (batch N, image i maximises channel from + i),
// previews streaming in live.
import { breadcrumbs, clear, errorBox, h, route, shape } from "../dom.js";
import { loadModel } from "./catalog.js";
import { depthChart } from "./depth.js";
import { jobPanel, optionsForm, previewEvery, submit } from "./render.js";
import { bestMean, cropGrid, datasetChooser, fetchExemplars, indexButton, ratioBadge } from "./examples.js";

const ROW = 5; // examples under each channel's render

export const LAYER_DEFAULTS = { steps: 128, size: 128, channels: 8 };

/** The objective of a batch whose image i shows channel first + i of layer. */
export function channelsObjective(layer, first, count) {
  return { sum: Array.from({ length: count }, (_, i) => ({
    batch: { index: i, objective: { channel: { layer, channel: first + i } } } })) };
}

export async function layerPage(root, [sha, name], state) {
  const { model, layers } = await loadModel(sha);
  const layer = layers.find((l) => l.name === name);
  if (!layer) {
    root.append(breadcrumbs(["Models", route.models()], [model.name, route.model(sha)], [name]),
      h("div.notice.bad", `No layer ${name} in this model.`));
    return undefined;
  }
  const maxImages = state.info?.limits.max_images_per_job || state.info?.limits.max_batch || 64;  // images per job
  const count = h("input#channel-count", { type: "number", min: 1, max: Math.min(maxImages, layer.channels),
    value: Math.min(LAYER_DEFAULTS.channels, layer.channels, maxImages) });
  const first = h("input#channel-first", { type: "number", min: 0, max: layer.channels - 1, value: 0 });
  const options = optionsForm({ steps: LAYER_DEFAULTS.steps, size: Math.min(LAYER_DEFAULTS.size,
    state.info?.limits.max_image_side || 1024) }, {
    declared: state.info?.options,
    extra: [h("label.field", h("span", "channels"), count, h("small", "N, rendered together")),
      h("label.field", h("span", "from channel"), first)],
  });
  const go = h("button.primary#render-layer", { type: "submit" }, "Render channels");
  const where = h("div");
  let panel = null;

  // dataset examples: a row under each channel's render, and the index job's button while the set has no index
  const chooser = datasetChooser(() => refreshExamples());
  const status = h("div.examples-status#layer-examples-status");
  let rows = new Map(); // channel -> {crops, ratio}
  let stopIndex = () => {};

  function exampleRow(c) {
    const row = { crops: h("div.row-crops"), ratio: h("span.ratio-slot") };
    rows.set(c, row);
    fillRow(c);
    return h("div.example-row", { dataset: { channel: c } }, row.crops, row.ratio);
  }
  async function fillRow(c) {
    await chooser.ready;
    const row = rows.get(c);
    if (!row || !chooser.value) return;
    try {
      const answer = await fetchExemplars(sha, chooser.value, layer.name, c, { k: ROW });
      clear(row.crops, answer ? cropGrid(answer, { row: true }) : null);
    } catch (error) {
      clear(row.crops, errorBox(error));
    }
  }
  async function refreshExamples() {
    await chooser.ready;
    clear(status);
    if (!chooser.value) return;
    try {
      if (!(await fetchExemplars(sha, chooser.value, layer.name, 0, { k: 1 }))) {
        clear(status, indexButton(sha, chooser.value, layer.name, (stop) => { stopIndex = stop; },
          () => refreshExamples()));
        return;
      }
    } catch (error) {
      clear(status, errorBox(error));
      return;
    }
    for (const c of rows.keys()) fillRow(c);
  }
  async function showRatios(result, channels) {
    if (result.state !== "SUCCEEDED" || !chooser.value) return;
    for (const image of result.result?.images || []) {
      const c = channels[image.index];
      const row = rows.get(c);
      const best = await bestMean(sha, chooser.value, layer.name, c).catch(() => null);
      if (row) clear(row.ratio, ratioBadge(image.objective_end, best));
    }
  }

  async function render(event) {
    event?.preventDefault();
    const n = Math.max(1, Math.min(Number(count.value), layer.channels - Number(first.value), maxImages));
    const from = Math.max(0, Number(first.value));
    const values = options.values();
    go.disabled = true;
    const job = await submit({ model: sha, objective: channelsObjective(layer.name, from, n), batch: n,
      preview_every: previewEvery(values.steps), preview_max_side: 128, ...values }, where);
    go.disabled = false;
    if (!job) return;
    panel?.close();
    const channels = Array.from({ length: n }, (_, i) => from + i);
    rows = new Map();
    panel = jobPanel({ labels: channels.map((c) => `channel ${c}`),
      links: channels.map((c) => route.channel(sha, layer.name, c)),
      below: (i) => exampleRow(channels[i]), onResult: (result) => showRatios(result, channels) });
    clear(where, panel.el);
    panel.follow(job);
  }

  root.append(
    breadcrumbs(["Models", route.models()], [model.name, route.model(sha)], [layer.name]),
    h("div.page-head",
      h("h1.mono", layer.name),
      h("p.lead", `${layer.op_type} · output ${shape(layer.shape)} · ${layer.channels} channels · depth ${layer.depth}`
        + (layer.aliases.length ? " · also " : ""), layer.aliases.map((a, i) => [i ? ", " : "", h("code", a)]))),
    depthChart(layers, { current: layer.name, href: (l) => route.layer(sha, l.name) }),
    h("form.render-form#layer-form", { onsubmit: render }, options.el, h("div.form-actions", go,
      h("span.muted", "One job: image i maximises channel “from + i”, all optimised together."))),
    h("section.examples-bar", h("strong", "Dataset examples "), chooser.el, status),
    where);
  refreshExamples();
  return () => { panel?.close(); stopIndex(); };
}
