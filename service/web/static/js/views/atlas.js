// Atlases: the tenant's atlas jobs and the form that starts one (live only); the atlas and unit pages themselves
// are atlas-pages.js (window.FeaturevizAtlas), the same code an exported site runs, here with a source over the
// gateway's API (api/atlases/...) and the job's server-sent events for live progress.
import { api, watchJob } from "../api.js";
import { ago, clear, errorBox, h, shortSha } from "../dom.js";

const ACTIVE = new Set(["QUEUED", "RUNNING"]);
const POLL_ACTIVE_MS = 1000;
const POLL_IDLE_MS = 5000;
const pages = () => window.FeaturevizAtlas;

const q = encodeURIComponent;

/** The live source of the atlas pages: every read is a gateway call with the session's token. */
export const liveSource = {
  live: true,
  sort: "index",
  atlas: (job) => api.get(`api/atlases/${q(job)}`),
  async units(job, layer) {
    const units = [];
    let token = "";
    do {
      const params = new URLSearchParams({ page_size: String(pages().PAGE), page_token: token });
      if (layer !== undefined) params.set("layer", layer);
      const page = await api.get(`api/atlases/${q(job)}/units?${params}`);
      units.push(...page.units);
      token = page.next_page_token;
    } while (token);
    return units;
  },
  async unit(job, key) {
    const found = (await liveSource.units(job)).find((u) => u.key === key);
    if (!found || !found.done) return found || null;
    return api.get(`api/atlases/${q(job)}/units/${found.index}`); // with the command that renders it again
  },
  imageUrl(job, unit, variant, k) {
    const params = variant === "render" ? "" : `?variant=${variant}${variant === "diversity" ? `&image=${k}` : ""}`;
    return `api/atlases/${q(job)}/units/${unit.index}.png${params}`;
  },
  async exemplars(job, unit) {
    const base = { model: unit.model, dataset: unit.dataset, layer: unit.layer, channel: String(unit.channel), k: "6" };
    const [top, bottom] = await Promise.all(["max", "min"].map((order) =>
      api.get(`api/exemplars?${new URLSearchParams({ ...base, order })}`)));
    return { top: top.exemplars, bottom: bottom.exemplars };
  },
  watch: (job, onChange) => watchJob(job, { progress: onChange, state: onChange, result: onChange }),
  cancel: (job) => api.post(`api/jobs/${q(job)}/cancel`),
};

export function atlasPage(root, params) {
  return pages().atlasPage(root, params, liveSource);
}

export function unitPage(root, params) {
  return pages().unitPage(root, params, liveSource);
}

/** `#/atlas`: the tenant's atlases, refreshed while one runs, and the form that starts one. */
export async function atlasesPage(root) {
  const body = h("tbody");
  const note = h("p.muted");
  let timer = null;
  let closed = false;

  async function refresh() {
    let atlases;
    try {
      ({ atlases } = await api.get("api/atlases"));
    } catch (error) {
      if (error.status !== 401) clear(note, errorBox(error));
      return;
    }
    if (closed) return;
    note.textContent = atlases.length ? "" : "No atlas yet. Start one below: every unit of a model's layers, one image each.";
    clear(body, atlases.map(atlasRow));
    timer = setTimeout(refresh, atlases.some((a) => ACTIVE.has(a.state)) ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  }

  root.append(
    h("div.page-head", h("h1", "Atlases"),
      h("p.lead", "One image per unit (a channel of a layer) of a model, rendered in the background of the shared device steps.")),
    h("table.atlases#atlas-table", h("thead", h("tr", h("th", "atlas"), h("th", "model"), h("th", "state"),
      h("th", "progress"), h("th", "created"))), body),
    note,
    await startForm());
  await refresh();
  return () => { closed = true; clearTimeout(timer); };
}

function atlasRow(atlas) {
  const p = atlas.progress;
  const pct = p.units ? Math.round((100 * p.done) / p.units) : 0;
  return h("tr", { dataset: { atlas: atlas.id, state: atlas.state } },
    h("td", h("a.mono", { href: pages().route.atlas(atlas.id) }, atlas.id.slice(0, 8))),
    h("td", atlas.model_name || shortSha(atlas.model)),
    h("td", h(`span.state.${atlas.state.toLowerCase()}`, atlas.state.toLowerCase())),
    h("td.progress-cell", h("div.bar.thin", h("span", { style: `width:${pct}%` })), h("small", `${p.done}/${p.units}`)),
    h("td.muted", ago(atlas.create_time)));
}

async function startForm() {
  const [{ models }, { datasets }] = await Promise.all([api.get("api/models"), api.get("api/datasets")]);
  const ready = models.filter((m) => m.state === "READY");
  const field = (label, input) => h("label", label, " ", input);
  const model = h("select#atlas-model", { name: "model", required: true },
    ready.map((m) => h("option", { value: m.sha256 }, m.display_name || shortSha(m.sha256))));
  const layers = h("input#atlas-layers", { name: "layers", placeholder: "all layers with channels" });
  const opTypes = h("input#atlas-op-types", { name: "op_types", placeholder: "e.g. Conv,Relu" });
  const channels = h("input#atlas-channels", { name: "channels", type: "number", min: 0, placeholder: "all" });
  const size = h("input#atlas-size", { name: "size", type: "number", min: 8, placeholder: "128" });
  const steps = h("input#atlas-steps", { name: "steps", type: "number", min: 1, placeholder: "256" });
  const seed = h("input#atlas-seed", { name: "seed", type: "number", min: 0, placeholder: "0" });
  const dataset = h("select#atlas-dataset", { name: "dataset" }, h("option", { value: "" }, "none"),
    datasets.map((d) => h("option", { value: d.id }, d.name || d.id.slice(0, 12))));
  const negative = h("input#atlas-negative", { name: "negative", type: "checkbox" });
  const diversity = h("input#atlas-diversity", { name: "diversity", type: "number", min: 0, placeholder: "0" });
  const message = h("div.form-message");
  const names = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);
  const int = (input) => (input.value === "" ? undefined : Number(input.value));
  const form = h("form.card.atlas-form#atlas-form", {
    onsubmit: async (event) => {
      event.preventDefault();
      clear(message);
      const body = { model: model.value, layers: names(layers.value), op_types: names(opTypes.value),
        channels: int(channels), size: int(size), steps: int(steps), seed: int(seed),
        dataset: dataset.value || undefined, negative: negative.checked || undefined, diversity: int(diversity) || undefined };
      try {
        const atlas = await api.post("api/atlases", body);
        location.hash = pages().route.atlas(atlas.id);
      } catch (error) {
        clear(message, errorBox(error));
      }
    },
  },
  h("h2", "Start an atlas"),
  ready.length ? null : h("p.muted", "Upload a model first."),
  h("div.form-grid", field("model", model), field("layers", layers), field("op types", opTypes),
    field("channels per layer", channels), field("size (px)", size), field("steps", steps), field("seed", seed),
    field("dataset", dataset), field("negative", negative), field("diversity", diversity)),
  h("div.card-actions", h("button.primary#atlas-start", { type: "submit", disabled: !ready.length }, "Start")),
  message);
  return form;
}
