// Small DOM helpers: h() builds elements, formatters turn numbers into words.

/** h("a.link", {href: "#/"}, "text", child, ...): a tag with optional .classes and #id, attributes, children. */
export function h(spec, attrs = {}, ...children) {
  const [, tag, rest] = spec.match(/^([a-z0-9]+)(.*)$/i);
  const el = document.createElement(tag);
  for (const part of rest.match(/[.#][^.#]+/g) || []) {
    if (part[0] === ".") el.classList.add(part.slice(1));
    else el.id = part.slice(1);
  }
  if (attrs === null || attrs instanceof Node || typeof attrs !== "object" || Array.isArray(attrs)) {
    children.unshift(attrs);
    attrs = {};
  }
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style") el.style.cssText = value; // CSSOM: allowed by the page's CSP, a style attribute is not
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value);
  }
  for (const child of children.flat()) if (child) el.append(child);
  return el;
}

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB"];
  let value = n / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

export function ago(iso) {
  if (!iso) return "";
  const seconds = (Date.now() - new Date(iso).getTime()) / 1000;
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

export function shortSha(sha) {
  return sha ? sha.slice(0, 12) : "";
}

export function shape(dims) {
  return dims && dims.length ? dims.join(" × ") : "?";
}

export function num(x, digits = 3) {
  if (x === undefined || x === null || Number.isNaN(x)) return "–";
  return Math.abs(x) >= 1000 || (Math.abs(x) < 0.001 && x !== 0) ? x.toExponential(2) : x.toFixed(digits);
}

/** The hash route of a model, a layer or a channel (layer names hold "/" and ":", so they are encoded). */
export const route = {
  models: () => "#/models",
  model: (sha) => `#/models/${sha}`,
  layer: (sha, layer) => `#/models/${sha}/layers/${encodeURIComponent(layer)}`,
  channel: (sha, layer, c) => `#/models/${sha}/layers/${encodeURIComponent(layer)}/channels/${c}`,
  classes: (sha) => `#/models/${sha}/classes`,
  jobs: () => "#/jobs",
  job: (id) => `#/jobs/${id}`,
};

export function errorBox(error) {
  const fields = (error.fieldViolations || []).filter(([, d]) => !error.message.includes(d));
  return h("div.notice.bad", { role: "alert" },
    h("strong", error.code || "error"), " ", error.message,
    fields.length ? h("ul", fields.map(([f, d]) => h("li", h("code", f), ": ", d))) : null);
}

export function breadcrumbs(...items) {
  const parts = [];
  items.forEach(([label, href], i) => {
    if (i) parts.push(h("span.sep", "›"));
    parts.push(href ? h("a", { href }, label) : h("span", label));
  });
  return h("nav.crumbs", parts);
}

/** A page of the tenant's uploads (Models, Datasets): a head, the page's uploader, and the list of cards, loaded by
 *  ``load()`` (-> the items) and refreshed after each upload or delete. ``uploader(refresh)`` makes the drop zone,
 *  ``card(item, refresh)`` a card; ``empty`` is said when there are none. */
export async function uploadsPage(root, { title, lead, listId, noun, empty, load, uploader, card }) {
  const list = h(`div.cards#${listId}`, h("p.muted", `Loading ${noun}…`));
  root.append(h("div.page-head", h("h1", title), h("p.lead", lead)), uploader(() => refresh()),
    h("h2.section", `Your ${noun}`), list);

  async function refresh() {
    const items = await load();
    if (!items.length) {
      clear(list, h("div.empty.small", h("p", empty)));
      return;
    }
    clear(list, items.map((item) => card(item, refresh)));
  }
  try {
    await refresh();
  } catch (error) {
    if (error.status !== 401) clear(list, errorBox(error));
  }
}
