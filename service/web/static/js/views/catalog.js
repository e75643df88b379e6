// A model's layer catalog: search, filters (op type, depth, channels), the depth picture, the table.
import { api } from "../api.js";
import { breadcrumbs, clear, h, route, shape, shortSha } from "../dom.js";
import { depthChart, family } from "./depth.js";

export const CLASS_COUNT = 1000; // ImageNet-1k: the classes page's names fit logits of this width

export async function loadModel(sha) {
  const [model, { layers }] = await Promise.all([api.get(`api/models/${sha}`), api.get(`api/models/${sha}/layers`)]);
  return { model, layers };
}

export function isImageNet(model, layers) {
  const logits = layers.find((l) => l.name === model.logits_layer || l.aliases.includes(model.logits_layer));
  return Boolean(logits && logits.channels === CLASS_COUNT);
}

export async function catalogPage(root, [sha]) {
  const { model, layers } = await loadModel(sha);
  const ops = [...new Set(layers.map((l) => l.op_type))].sort();
  const maxDepth = Math.max(0, ...layers.map((l) => l.depth));
  const maxChannels = Math.max(0, ...layers.map((l) => l.channels));
  const params = new URLSearchParams(sessionStorage.getItem(`catalog:${sha}`) || "");

  const search = h("input#layer-search", { type: "search", placeholder: "Search names, e.g. conv or blocks.9",
    value: params.get("q") || "" });
  const op = h("select#op-filter", h("option", { value: "" }, "all op types"),
    ops.map((o) => h("option", { value: o, selected: params.get("op") === o },
      `${o} (${layers.filter((l) => l.op_type === o).length})`)));
  const depthMin = h("input#depth-min", { type: "number", min: 0, max: maxDepth, value: params.get("dmin") || 0 });
  const depthMax = h("input#depth-max", { type: "number", min: 0, max: maxDepth, value: params.get("dmax") || maxDepth });
  const channelsMin = h("input#channels-min", { type: "number", min: 0, max: maxChannels,
    value: params.get("cmin") || 1 });
  const spatial = h("input#spatial-only", { type: "checkbox", checked: params.get("spatial") === "1" });
  const count = h("span.count");
  const chart = h("div.chart");
  const body = h("tbody");

  function filtered() {
    const q = search.value.trim().toLowerCase();
    const lo = Number(depthMin.value || 0);
    const hi = Number(depthMax.value === "" ? maxDepth : depthMax.value);
    const cmin = Number(channelsMin.value || 0);
    return layers.filter((l) => (!q || l.name.toLowerCase().includes(q) || l.aliases.some((a) => a.toLowerCase().includes(q)))
      && (!op.value || l.op_type === op.value) && l.depth >= lo && l.depth <= hi && l.channels >= cmin
      && (!spatial.checked || l.spatial));
  }

  function update() {
    const shown = filtered();
    sessionStorage.setItem(`catalog:${sha}`, new URLSearchParams({ q: search.value, op: op.value,
      dmin: depthMin.value, dmax: depthMax.value, cmin: channelsMin.value, spatial: spatial.checked ? "1" : "" }));
    count.textContent = `${shown.length} of ${layers.length} layers`;
    clear(chart, depthChart(layers, { matches: new Set(shown.map((l) => l.name)),
      href: (l) => route.layer(sha, l.name) }));
    clear(body, shown.slice(0, 500).map((l) => layerRow(sha, l)));
    if (shown.length > 500) body.append(h("tr", h("td.muted", { colSpan: 5 }, `… ${shown.length - 500} more: narrow the filter`)));
  }
  for (const el of [search, op, depthMin, depthMax, channelsMin, spatial]) el.addEventListener("input", update);

  root.append(
    breadcrumbs(["Models", route.models()], [model.name]),
    h("div.page-head",
      h("h1", model.name),
      h("p.lead", `${model.layer_count} layers · input ${model.input.channels} × ${model.input.default_size.join(" × ")} · `,
        h("code", { title: model.sha256 }, shortSha(model.sha256))),
      isImageNet(model, layers)
        ? h("p", h("a.button", { href: route.classes(sha) }, "ImageNet classes →"),
          h("span.muted", " render a class by its name"))
        : null),
    chart,
    h("div.filters",
      h("label.grow", "Search ", search),
      h("label", "Op ", op),
      h("label", "Depth ", depthMin, " – ", depthMax),
      h("label", "Channels ≥ ", channelsMin),
      h("label.check", spatial, " spatial only"),
      count),
    h("table.layers#layer-table",
      h("thead", h("tr", h("th", "depth"), h("th", "layer"), h("th", "op"), h("th", "output shape"), h("th.num", "channels"))),
      body));
  update();
}

function layerRow(sha, layer) {
  const [name, colour] = family(layer.op_type);
  return h("tr",
    h("td.num.muted", String(layer.depth)),
    h("td", h("a.layer-link", { href: route.layer(sha, layer.name) }, layer.name),
      layer.is_logits ? h("span.pill", "logits") : null),
    h("td", h("span.op", { title: name, style: `--op:${colour}` }, layer.op_type)),
    h("td.mono", shape(layer.shape)),
    h("td.num", String(layer.channels)));
}
