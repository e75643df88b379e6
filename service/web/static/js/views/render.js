// A job on screen: progress, live previews from the job's events, the final images, and what reproduces it
// (each PNG, the spec as JSON, the equivalent `featureviz render` command).
import { api, watchJob } from "../api.js";
import { clear, errorBox, h, num, route } from "../dom.js";

const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

/** Submit a job; body: the JSON of POST api/jobs. Resolves with the created job or shows the error in `where`. */
export async function submit(body, where) {
  try {
    return await api.post("api/jobs", body);
  } catch (error) {
    if (where) clear(where, errorBox(error));
    return null;
  }
}

/** options: {labels: [text per image], links: [href per image] | null, large: bool, below: (i) => element under
 *  image i's tile | null, onResult: (finished job) => void} */
export function jobPanel({ labels = null, links = null, large = false, below = null, onResult = null } = {}) {
  const badge = h("span.state");
  const line = h("span.progress-text");
  const fill = h("span");
  const bar = h("div.bar", fill);
  const cancel = h("button.subtle#cancel-job", { type: "button", hidden: true }, "Cancel");
  const tiles = h(`div.tiles${large ? ".large" : ""}`);
  const reproduce = h("div.reproduce", { hidden: true });
  const problem = h("div");
  const el = h("section.job-panel", h("div.job-status", badge, line, h("span.spacer"), cancel), bar, problem, tiles,
    reproduce);
  let stop = () => {};
  let job = null;
  let tileEls = [];

  function makeTiles(count, names) {
    tileEls = Array.from({ length: count }, (_, i) => {
      const label = names[i] || `image ${i}`;
      const img = h("img", { alt: label });
      const frame = h("div.frame.waiting", img);
      const caption = h("figcaption", { title: label }, links?.[i] ? h("a", { href: links[i] }, label) : label);
      const value = h("span.value");
      const download = h("span.downloads");
      const figure = h("figure.tile", { dataset: { index: i } }, frame, h("div.tile-foot", caption, value, download),
        below ? below(i) : null);
      return { figure, img, frame, value, download };
    });
    clear(tiles, tileEls.map((t) => t.figure));
  }

  function setState(state) {
    badge.textContent = state.toLowerCase();
    badge.className = `state ${state.toLowerCase()}`;
    cancel.hidden = TERMINAL.has(state);
    el.dataset.state = state;
  }

  function progress(step, steps, objective, secondsPerStep) {
    fill.style.width = `${steps ? (100 * Math.min(step, steps)) / steps : 0}%`;
    const mean = objective?.length ? objective.reduce((a, b) => a + b, 0) / objective.length : null;
    line.textContent = `step ${step} / ${steps}` + (secondsPerStep ? ` · ${secondsPerStep.toFixed(3)} s/step` : "")
      + (mean !== null ? ` · objective ${num(mean)}` : "");
    objective?.forEach((v, i) => { if (tileEls[i]) tileEls[i].value.textContent = num(v, 2); });
  }

  async function finish(result) {
    job = result;
    setState(result.state);
    progress(result.step, result.steps, result.objective);
    bar.classList.toggle("done", result.state === "SUCCEEDED");
    for (const image of result.result?.images || []) {
      const tile = tileEls[image.index];
      if (!tile) continue;
      tile.img.src = image.url;
      tile.frame.classList.remove("waiting");
      tile.value.textContent = num(image.objective_end, 2);
      tile.value.title = `objective ${num(image.objective_start)} → ${num(image.objective_end)}`;
      clear(tile.download, h("a.png-link", { href: `${image.url}?download=1`, download: `featureviz-${job.id.slice(0, 12)}-${image.index}.png`, title: "download this image as PNG" }, "PNG"));
    }
    if (result.error) clear(problem, errorBox({ code: result.error.code, message: result.error.message, fieldViolations: [] }));
    if (result.state === "CANCELLED") {
      clear(problem, h("div.notice", `Cancelled at step ${result.step} of ${result.steps}`
        + (result.result?.images?.length ? "; the images so far are kept." : ".")));
    }
    onResult?.(result);
    await showReproduce(result);
  }

  async function showReproduce(result) {
    if (!result.result?.images?.length) return;
    let cli = "";
    try {
      cli = (await api.get(`api/jobs/${result.id}`)).cli;
    } catch { /* the command is a convenience: leave it out */ }
    const code = h("pre.cli", h("code", cli));
    const copy = h("button.subtle", { type: "button" }, "Copy");
    copy.addEventListener("click", async () => {
      try { await navigator.clipboard.writeText(cli); copy.textContent = "Copied"; } catch { copy.textContent = "Select and copy"; }
    });
    clear(reproduce,
      h("div.reproduce-head",
        h("strong", "Reproduce"),
        h("a.button.small#download-spec", { href: `api/jobs/${result.id}/spec.json`, download: `featureviz-${result.id.slice(0, 12)}.json` }, "spec.json"),
        result.result.images.length > 1 ? h("span.muted.small", "each image: its PNG link") : h("a.button.small#download-png", { href: `${result.result.images[0].url}?download=1`, download: `featureviz-${result.id.slice(0, 12)}-0.png` }, "PNG"),
        h("a.small", { href: route.job(result.id) }, `job ${result.id}`),
        h("span.spacer"), copy),
      cli ? code : null);
    reproduce.hidden = false;
  }

  cancel.addEventListener("click", async () => {
    if (!job) return;
    cancel.disabled = true;
    try {
      await api.post(`api/jobs/${job.id}/cancel`);
    } catch (error) {
      clear(problem, errorBox(error));
    }
    cancel.disabled = false;
  });

  function follow(created) {
    stop();
    job = created;
    clear(problem);
    reproduce.hidden = true;
    bar.classList.remove("done");
    makeTiles(created.spec.batch || 1, labels || created.image_labels || []);
    setState(created.state);
    progress(created.step, created.steps, created.objective);
    el.dataset.job = created.id;
    stop = watchJob(created.id, {
      snapshot: (snap) => {
        job = snap;
        setState(snap.state);
        if (snap.state === "QUEUED") line.textContent = `queued (position ${snap.queue_position + 1})`;
        else progress(snap.step, snap.steps, snap.objective);
      },
      state: ({ state }) => setState(state),
      progress: (p) => progress(p.step, p.steps, p.objective, p.seconds_per_step),
      preview: (p) => {
        for (const image of p.images) {
          const tile = tileEls[image.index];
          if (!tile) continue;
          tile.img.src = image.src;
          tile.frame.classList.remove("waiting");
        }
      },
      result: finish,
      failure: async () => finish(await api.get(`api/jobs/${created.id}`)),
      error: async () => {
        try { finish(await api.get(`api/jobs/${created.id}`)); } catch (error) { clear(problem, errorBox(error)); }
      },
    });
  }

  return { el, follow, close: () => stop() };
}

// The form's labels; which options it shows, their choices, ranges and defaults come from the server's declaration
// (ServerInfo.job_options, `state.info.options` from api/info): the options declared for the "form" surface.
const LABELS = { steps: "steps", size: "size (px)", param: "parameterization", transforms: "transforms",
  batch: "batch", seed: "seed", lr: "learning rate", lr_schedule: "lr schedule" };
const HINTS = { batch: "images at once" };

/**
 * The job options of the explorer's form, one field each. `declared`: the server's job options by name
 * (`state.info.options`); `defaults`: this page's own values by option name; `batch`: show the batch field.
 */
export function optionsForm(defaults, { declared = {}, batch = false, extra = [] } = {}) {
  const field = (label, input, hint) => h("label.field", h("span", label), input, hint ? h("small", hint) : null);
  const shown = Object.values(declared).filter((o) => (o.surfaces || []).includes("form")
    && (o.name !== "batch" || batch));
  const inputs = {};
  for (const option of shown) {
    const value = defaults[option.name] ?? option.default;
    if (option.type === "choice") {
      inputs[option.name] = h("select", { name: option.name }, option.choices.map((c) =>
        h("option", { value: c, selected: c === value }, c)));
    } else {
      const bounds = { min: option.minimum, max: option.maximum };
      if (option.name === "lr") bounds.min = Math.max(option.minimum ?? 0, 0.0001); // a usable floor for the arrows
      inputs[option.name] = h("input", { type: "number", name: option.name, step: option.type === "float" ? "any" : 1,
        ...Object.fromEntries(Object.entries(bounds).filter(([, v]) => v !== undefined)), value: value ?? "" });
    }
    inputs[option.name].title = option.help;
  }
  const el = h("div.option-rows", h("div.options",
    shown.map((o) => field(LABELS[o.name] || o.name.replaceAll("_", " "), inputs[o.name], HINTS[o.name]))),
  extra.length ? h("div.options.extra", extra) : null);
  const values = () => Object.fromEntries(shown.map((o) => [o.name,
    o.type === "choice" ? inputs[o.name].value : Number(inputs[o.name].value)]));
  return { el, inputs, values };
}

/** Preview cadence: about 16 previews per job. */
export function previewEvery(steps) {
  return Math.max(1, Math.round(steps / 16));
}
