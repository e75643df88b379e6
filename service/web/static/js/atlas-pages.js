// The atlas pages: one atlas (its layers with their progress, a layer's grid of units) and one unit (its render,
// negative and diversity renders, dataset examples, scores and the command that renders it again).
//
// ONE copy of these pages serves both the live explorer and an exported site (`featureviz atlas export`): each
// page reads its data through a *source*. The explorer (views/atlas.js) passes one over the gateway's API; an
// exported site passes staticSource(window.FEATUREVIZ_ATLAS_SITE), the manifest that data/atlas.js sets. This file
// is a classic script, not an ES module, because Chromium loads no module script from file://.
//
// Every string of the model (a layer name) is data: it reaches the page as a text node or an attribute value
// (never HTML), and a URL only through encodeURIComponent or our own ids (job id, unit index, unit key).
(function () {
  "use strict";

  const CHUNK = 96; // tiles added to a grid at a time, as its end scrolls into view
  const PAGE = 500; // units per ListAtlasUnits page

  function h(spec, attrs, ...children) {
    const [, tag, rest] = spec.match(/^([a-z0-9]+)(.*)$/i);
    const el = document.createElement(tag);
    for (const part of rest.match(/[.#][^.#]+/g) || []) {
      if (part[0] === ".") el.classList.add(part.slice(1));
      else el.id = part.slice(1);
    }
    if (attrs === null || attrs === undefined || attrs instanceof Node || typeof attrs !== "object" || Array.isArray(attrs)) {
      children.unshift(attrs);
      attrs = {};
    }
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key === "style") el.style.cssText = value; // CSSOM: the explorer's CSP allows no style attribute
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  function clear(el, ...children) {
    el.replaceChildren();
    for (const child of children.flat(Infinity)) if (child !== null && child !== undefined && child !== false) el.append(child);
    return el;
  }

  function num(x, digits = 3) {
    if (x === undefined || x === null || Number.isNaN(x)) return "–";
    return Math.abs(x) >= 1000 || (Math.abs(x) < 0.001 && x !== 0) ? x.toExponential(2) : x.toFixed(digits);
  }

  function duration(seconds) {
    if (!seconds || seconds <= 0) return "";
    if (seconds < 90) return `${Math.round(seconds)} s`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  const route = {
    atlases: () => "#/atlas",
    atlas: (job) => `#/atlas/${encodeURIComponent(job)}`,
    layer: (job, i) => `#/atlas/${encodeURIComponent(job)}/layer/${i}`,
    unit: (job, key) => `#/atlas/${encodeURIComponent(job)}/unit/${encodeURIComponent(key)}`,
  };

  function crumbs(source, ...items) {
    const parts = [];
    const all = source.live ? [["Atlases", route.atlases()], ...items] : items;
    all.forEach(([label, href], i) => {
      if (i) parts.push(h("span.sep", "›"));
      parts.push(href ? h("a", { href }, label) : h("span", label));
    });
    return h("nav.crumbs", parts);
  }

  function errorBox(error) {
    return h("div.notice.bad", { role: "alert" }, h("strong", error.code || "error"), " ", error.message || String(error));
  }

  // the order of a layer's grid: dead units always last
  const SORTS = {
    index: { label: "index", key: (u) => u.index },
    ratio: { label: "activation ratio", key: (u) => -(u.activation_ratio || 0) },
    selectivity: { label: "selectivity", key: (u) => -(u.selectivity || 0) },
  };

  function sorted(units, sort) {
    const key = (SORTS[sort] || SORTS.index).key;
    return [...units].sort((a, b) => (a.dead - b.dead) || (key(a) - key(b)) || (a.index - b.index));
  }

  function progressLine(progress) {
    const pct = progress.units ? Math.round((100 * progress.done) / progress.units) : 0;
    const parts = [`${progress.done} of ${progress.units} units`];
    if (progress.cached) parts.push(`${progress.cached} from the store`);
    if (progress.failed) parts.push(`${progress.failed} failed`);
    if (progress.units_per_hour) parts.push(`${Math.round(progress.units_per_hour)} units/h`);
    const eta = duration(progress.eta_seconds);
    if (eta && progress.done < progress.units) parts.push(`about ${eta} left`);
    return h("div.atlas-progress", { dataset: { done: progress.done, units: progress.units } },
      h(`div.bar${progress.done >= progress.units ? ".done" : ""}`, h("span", { style: `width:${pct}%` })),
      h("small.atlas-total", parts.join(" · ")));
  }

  // ------------------------------------------------------------------------------------------ one atlas

  /** `#/atlas/JOB` and `#/atlas/JOB/layer/N`: the layers with their progress, and layer N's grid of units. */
  async function atlasPage(root, [job, layerIndex], source) {
    const atlas = await source.atlas(job);
    const layers = atlas.progress.layers;
    const current = Math.min(Math.max(parseInt(layerIndex || "0", 10) || 0, 0), Math.max(layers.length - 1, 0));
    const layer = layers[current];
    const head = h("div.atlas-head");
    const layerBody = h("tbody");
    const grid = h("div.unit-grid#unit-grid", { dataset: { layer: current } });
    const sortSelect = h("select#unit-sort", { "aria-label": "sort the units" },
      Object.entries(SORTS).map(([value, s]) => h("option", { value }, s.label)));
    sortSelect.value = source.sort || "index";
    let units = [];
    let closed = false;
    let state = atlas.state;

    function showHead(a) {
      const opts = a.options.render || {};
      const cancel = source.live && ["QUEUED", "RUNNING"].includes(a.state)
        ? h("button.subtle.cancel#atlas-cancel", { type: "button", onclick: async (e) => {
          e.target.disabled = true;
          try { await source.cancel(job); } catch (error) { e.target.replaceWith(errorBox(error)); }
        } }, "Cancel") : null;
      clear(head,
        h("div.page-head", h("h1", "Atlas ", h("span.mono", job.slice(0, 8))),
          h("p.lead", a.model_name || a.model.slice(0, 12), " · ",
            h(`span.state.${a.state.toLowerCase()}#atlas-state`, a.state.toLowerCase()),
            ` · ${opts.size ? opts.size.join("×") : "?"} px, ${opts.steps ?? "?"} steps, seed ${opts.seed ?? 0}`,
            a.progress.device_seconds ? ` · ${num(a.progress.device_seconds, 1)} device-seconds` : "")),
        progressLine(a.progress), cancel, a.error ? h("div.notice.bad", a.error) : null);
    }

    function showLayers(progress) {
      clear(layerBody, progress.layers.map((l, i) => {
        const pct = l.units ? Math.round((100 * l.done) / l.units) : 0;
        return h(`tr${i === current ? ".current" : ""}`, { dataset: { layer: i } },
          h("td", h("a.layer-link", { href: route.layer(job, i) }, l.layer)),
          h("td.muted", String(l.depth)),
          h("td.progress-cell", h(`div.bar.thin${l.done >= l.units ? ".done" : ""}`, h("span", { style: `width:${pct}%` })),
            h("small.layer-done", `${l.done}/${l.units}`)));
      }));
    }

    // the grid: every unit of the layer as a tile, added CHUNK at a time as the end scrolls into view; a tile holds
    // its image only while it is on screen (or near) and its unit is done (a 1000-unit layer never holds 1000 images)
    const tiles = new Map(); // index -> tile
    const visible = new Set();
    let order = [];
    let shown = 0;
    const sentinel = h("div.grid-end");
    const seen = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        const index = Number(entry.target.dataset.index);
        if (entry.isIntersecting) {
          visible.add(index);
          fillTile(entry.target);
        } else if (visible.delete(index)) { // off screen: its image goes (the browser's cache keeps the bytes)
          const thumb = entry.target.querySelector(".unit-thumb");
          if (thumb.querySelector("img")) clear(thumb, h("span.pending", entry.target._unit.channel));
        }
      }
    }, { rootMargin: "300px" });
    const more = new IntersectionObserver((entries) => {
      if (entries.some((e) => e.isIntersecting)) addTiles();
    }, { rootMargin: "600px" });

    function tileFor(unit) {
      const tile = h("a.unit-tile", { href: route.unit(job, unit.key), dataset: { index: unit.index, key: unit.key },
        title: `${unit.layer} : ${unit.channel}` },
      h("div.unit-thumb", h("span.pending", unit.channel)),
      h("div.unit-foot", h("span.unit-channel", `#${unit.channel}`),
        h("span.unit-score.muted"), h("span.badge.dead", { hidden: true }, "dead")));
      tile._unit = unit;
      return tile;
    }

    function fillTile(tile) {
      const unit = tile._unit;
      tile.classList.toggle("done", unit.done);
      tile.classList.toggle("is-dead", !!unit.dead);
      tile.querySelector(".badge.dead").hidden = !unit.dead;
      tile.querySelector(".unit-score").textContent = unit.activation_ratio ? `ratio ${num(unit.activation_ratio, 2)}` : "";
      const thumb = tile.querySelector(".unit-thumb");
      if (unit.done && visible.has(unit.index) && !thumb.querySelector("img")) {
        clear(thumb, h("img", { src: source.imageUrl(job, unit, "render", 0), alt: `channel ${unit.channel}`,
          width: 96, height: 96, decoding: "async" }));
      }
    }

    function addTiles() {
      const next = order.slice(shown, shown + CHUNK);
      for (const unit of next) {
        const tile = tileFor(unit);
        tiles.set(unit.index, tile);
        grid.insertBefore(tile, sentinel);
        seen.observe(tile);
      }
      shown += next.length;
      grid.dataset.shown = shown;
      if (next.length) { more.unobserve(sentinel); more.observe(sentinel); } // still in reach: the next chunk
    }

    function layoutGrid() {
      for (const tile of tiles.values()) seen.unobserve(tile);
      tiles.clear();
      visible.clear();
      clear(grid, sentinel);
      order = sorted(units, sortSelect.value);
      shown = 0;
      addTiles();
      grid.dataset.units = units.length;
    }

    function updateUnits(fresh) {
      const before = new Map(units.map((u) => [u.index, u]));
      units = fresh;
      if (fresh.length !== before.size) return layoutGrid();
      for (const unit of fresh) {
        const tile = tiles.get(unit.index);
        if (tile) { tile._unit = unit; fillTile(tile); }
      }
      const positions = new Map(units.map((u) => [u.index, u]));
      order = order.map((u) => positions.get(u.index) || u);
      grid.dataset.done = fresh.filter((u) => u.done).length;
      return undefined;
    }

    sortSelect.addEventListener("change", () => {
      source.sort = sortSelect.value;
      sortSelect.scrollIntoView({ block: "start" }); // the new order from its start
      layoutGrid();
    });
    root.append(
      crumbs(source, ["Atlas " + job.slice(0, 8), null]),
      head,
      h("div.atlas-body",
        h("section.atlas-layers", h("h2", "Layers"),
          h("table.atlas-layer-table#atlas-layers", h("thead", h("tr", h("th", "layer"), h("th", "depth"), h("th", "units"))), layerBody)),
        h("section.atlas-units",
          h("div.grid-head", h("h2", layer ? layer.layer : "No units"),
            h("label.muted", "sort by ", sortSelect), h("small.muted", "dead units last")),
          grid)));
    showHead(atlas);
    showLayers(atlas.progress);
    grid.append(sentinel);
    more.observe(sentinel);
    if (layer) {
      units = await source.units(job, layer.layer);
      layoutGrid();
      grid.dataset.done = units.filter((u) => u.done).length;
    }

    // live: each finished unit is a progress event; refresh the head, the layers and the grid (one read at a time)
    let reading = false;
    let again = false;
    async function refresh() {
      if (reading) { again = true; return; }
      reading = true;
      try {
        do {
          again = false;
          const a = await source.atlas(job);
          if (closed) return;
          state = a.state;
          showHead(a);
          showLayers(a.progress);
          if (layer) updateUnits(await source.units(job, layer.layer));
        } while (again && !closed);
      } catch (error) {
        if (!closed) head.append(errorBox(error));
      } finally {
        reading = false;
      }
    }
    const stop = source.live && ["QUEUED", "RUNNING"].includes(state) ? source.watch(job, refresh) : () => {};
    return () => { closed = true; stop(); seen.disconnect(); more.disconnect(); };
  }

  // ------------------------------------------------------------------------------------------ one unit

  /** `#/atlas/JOB/unit/KEY`: the permalink of a unit by its content hash. */
  async function unitPage(root, [job, key], source) {
    const atlas = await source.atlas(job);
    const unit = await source.unit(job, key);
    if (!unit) {
      root.append(crumbs(source, ["Atlas " + job.slice(0, 8), route.atlas(job)], ["unit", null]),
        h("div.empty", h("h2", "No such unit"), h("p", "This atlas has no unit with this key.")));
      return undefined;
    }
    const layerIndex = atlas.progress.layers.findIndex((l) => l.layer === unit.layer);
    const opts = atlas.options.render || {};
    const figure = (src, caption, cls) => h(`figure.unit-figure${cls ? "." + cls : ""}`,
      h("img", { src, alt: caption }), h("figcaption", caption));
    const renders = h("div.unit-renders");
    if (unit.done) {
      renders.append(figure(source.imageUrl(job, unit, "render", 0), "render", "render"));
      if (unit.negative_done) renders.append(figure(source.imageUrl(job, unit, "negative", 0), "negative", "negative"));
    } else {
      renders.append(h("div.empty.small#unit-pending", "Not rendered yet."));
    }
    const diversity = unit.diversity_done
      ? h("section.unit-diversity", h("h2", "Diversity"),
        h("div.unit-renders", Array.from({ length: unit.diversity_done }, (_, k) =>
          figure(source.imageUrl(job, unit, "diversity", k), `diversity ${k + 1}`, "diversity"))))
      : null;
    const scores = [
      ["activation ratio", unit.activation_ratio ? num(unit.activation_ratio, 3) : "–", "ratio"],
      ["selectivity (p99/p50)", unit.selectivity ? num(unit.selectivity, 2) : "–", "selectivity"],
      ["dataset p50 / p99 / max", unit.exemplar_index ? `${num(unit.dataset_p50)} / ${num(unit.dataset_p99)} / ${num(unit.dataset_max)}` : "–", "dataset"],
      ["render score", unit.exemplar_index ? num(unit.render_score) : "–", "render-score"],
      ["objective", unit.done ? num(unit.objective) : "–", "objective"],
      ["device", unit.device ? `${unit.device}, ${num(unit.device_seconds, 2)} s` : "–", "device"],
      ["served from the store", unit.cached ? "yes" : "no", "cached"],
      ["key", unit.key, "key"],
    ];
    const examples = h("section.unit-examples", h("h2", "Dataset examples"));
    if (!unit.exemplar_index) {
      examples.append(h("p.muted", "No dataset joined to this atlas."));
    } else {
      try {
        const { top, bottom } = await source.exemplars(job, unit);
        const row = (title, list, cls) => h(`div.example-row.${cls}`, h("h3", title),
          h("div.example-crops", list.map((e) => h("figure.example", h("img", { src: e.crop_url, alt: e.name || "" }),
            h("figcaption", h("span.name", e.name || ""), " ", h("span.value.muted", num(e.value)))))));
        examples.append(row("top", top, "top"), row("bottom", bottom, "bottom"));
      } catch (error) {
        examples.append(errorBox(error));
      }
    }
    root.append(
      crumbs(source, ["Atlas " + job.slice(0, 8), route.atlas(job)],
        [unit.layer, layerIndex >= 0 ? route.layer(job, layerIndex) : null], [`channel ${unit.channel}`, null]),
      h("div.page-head", h("h1.unit-title", h("span.unit-layer", unit.layer), ` : ${unit.channel}`),
        unit.dead ? h("span.badge.dead", "dead: never active on the dataset") : null,
        h("p.lead", `${opts.size ? opts.size.join("×") : "?"} px, ${opts.steps ?? "?"} steps, seed ${opts.seed ?? 0}`)),
      renders, diversity,
      h("table.unit-scores#unit-scores", h("tbody", scores.map(([label, value, cls]) =>
        h(`tr.${cls}`, h("th", label), h("td.mono", value))))),
      examples,
      unit.cli ? h("section.unit-cli", h("h2", "Render it again"), h("pre.cli#unit-cli", unit.cli)) : null);
    return undefined;
  }

  // ------------------------------------------------------------------------------------------ the sources

  /** The source of an exported site: the manifest (data/atlas.js) and the images beside it. */
  function staticSource(site) {
    const byKey = new Map(site.units.map((u) => [u.key, u]));
    const atlas = { id: site.job, state: String(site.state).replace(/^JOB_STATE_/, ""), model: site.model,
      model_name: site.model_name, options: { render: site.options, atlas: site.selection },
      progress: site.progress, error: null };
    return {
      live: false,
      atlas: async () => atlas,
      units: async (job, layer) => site.units.filter((u) => u.layer === layer),
      unit: async (job, key) => byKey.get(key) || null,
      imageUrl: (job, unit, variant, k) => {
        const files = unit.files || {};
        if (variant === "negative") return files.negative;
        if (variant === "diversity") return (files.diversity || [])[k];
        return files.render;
      },
      exemplars: async (job, unit) => unit.exemplars || { top: [], bottom: [] },
    };
  }

  /** An exported site: the atlas page and the unit pages, routed by the location's hash as the explorer is. */
  function boot(site) {
    const view = document.getElementById("view");
    const source = staticSource(site);
    const routes = [
      [/^#\/atlas\/([\w-]+)(?:\/layer\/(\d+))?$/, atlasPage],
      [/^#\/atlas\/([\w-]+)\/unit\/([0-9a-f]{64})$/, unitPage],
    ];
    let cleanup = () => {};
    async function show() {
      cleanup();
      cleanup = () => {};
      const hash = location.hash && location.hash !== "#" ? location.hash : route.atlas(site.job);
      view.replaceChildren();
      for (const [pattern, page] of routes) {
        const match = hash.match(pattern);
        if (!match) continue;
        try {
          cleanup = (await page(view, match.slice(1).map((p) => (p === undefined ? p : decodeURIComponent(p))), source)) || (() => {});
        } catch (error) {
          clear(view, errorBox(error));
        }
        return;
      }
      clear(view, h("div.empty", h("h2", "Nothing here"), h("p", h("a", { href: route.atlas(site.job) }, "Go to the atlas."))));
    }
    window.addEventListener("hashchange", show);
    show();
  }

  window.FeaturevizAtlas = { atlasPage, unitPage, staticSource, boot, route, sorted, SORTS, PAGE };
  if (window.FEATUREVIZ_ATLAS_SITE) {
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", () => boot(window.FEATUREVIZ_ATLAS_SITE));
    } else {
      boot(window.FEATUREVIZ_ATLAS_SITE);
    }
  }
})();
