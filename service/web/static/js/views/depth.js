// A small picture of a network's depth: one bar per layer in topological order, its height the log of the
// layer's channels, its colour the kind of op. Layers that pass the filter are bright; a click opens a layer.
import { h, svg } from "../dom.js";

export const OP_FAMILIES = [
  ["conv", "#4f46e5", /conv/i],
  ["activation", "#f59e0b", /relu|clip|sigmoid|tanh|swish|gelu|silu|elu|softplus|hardswish|hardsigmoid|prelu|mish/i],
  ["norm", "#10b981", /norm/i],
  ["pool", "#06b6d4", /pool|reduce/i],
  ["arithmetic", "#a855f7", /^(add|mul|sub|div|sum|concat|matmul)$/i],
  ["dense", "#ef4444", /gemm|linear|softmax/i],
  ["other", "#94a3b8", /./],
];

export function family(opType) {
  return OP_FAMILIES.find(([, , re]) => re.test(opType));
}

/** layers: the catalog; options: {matches: Set of names | null, current: name, href: layer => url} */
export function depthChart(layers, { matches = null, current = null, href } = {}) {
  const width = 1000;
  const height = 96;
  const n = Math.max(layers.length, 1);
  const step = width / n;
  const maxLog = Math.max(1, ...layers.map((l) => Math.log2(1 + Math.max(l.channels, 1))));
  const bars = layers.map((layer, i) => {
    const [, colour] = family(layer.op_type);
    const barHeight = 8 + ((height - 14) * Math.log2(1 + Math.max(layer.channels, 1))) / maxLog;
    const dim = matches && !matches.has(layer.name);
    const rect = svg("rect", {
      x: (i * step).toFixed(2), y: (height - barHeight).toFixed(2),
      width: Math.max(step - (step > 3 ? 1 : 0), 0.6).toFixed(2), height: barHeight.toFixed(2),
      fill: colour, opacity: dim ? 0.15 : 0.9, class: layer.name === current ? "current" : "",
    }, svg("title", {}, document.createTextNode(
      `${layer.name}\n${layer.op_type} · ${layer.channels} channels · depth ${layer.depth}`)));
    return href ? svg("a", { href: href(layer) }, rect) : rect;
  });
  const marker = current ? layers.findIndex((l) => l.name === current) : -1;
  const picture = svg("svg", { viewBox: `0 0 ${width} ${height + 4}`, preserveAspectRatio: "none",
    class: "depth-svg", role: "img", "aria-label": "the network's layers by depth" }, bars,
  marker >= 0 ? svg("rect", { x: (marker * step - 1).toFixed(2), y: 0, width: Math.max(step + 2, 3).toFixed(2),
    height: height + 4, class: "marker" }) : null);
  const used = new Set(layers.map((l) => family(l.op_type)[0]));
  const legend = h("div.legend", OP_FAMILIES.filter(([name]) => used.has(name)).map(([name, colour]) =>
    h("span", h("i", { style: `background:${colour}` }), name)),
  h("span.muted", "input → output; bar height: log channels"));
  return h("figure.depth", picture, legend);
}
