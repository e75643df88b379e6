// Dataset examples beside the renders: the set chooser, a channel's top (or bottom) crops from the exemplar index,
// the index job's button and progress when the set has no index for the layer yet, the whole image with its box,
// and the activation ratio (the render's objective over the best real image's spatial mean).
import { api, watchJob } from "../api.js";
import { clear, errorBox, h, num, route } from "../dom.js";

const CHOICE = "featureviz-dataset"; // the chosen set, shared by the layer and channel pages
export const RATIO_TITLE = "Activation ratio: the render's objective (the channel's spatial mean) divided by the "
  + "best real image's, in the chosen dataset. Above 1: the optimization went that far beyond anything in the data.";

/** The set chooser: {el, value, ready} (ready resolves once the list is in; value '' when the tenant has none). */
export function datasetChooser(onChange) {
  const select = h("select#dataset-select", { title: "the dataset the examples come from" });
  const el = h("label.dataset-chooser", h("span.muted", "dataset "), select);
  const ready = api.get("api/datasets").then(({ datasets }) => {
    if (!datasets.length) {
      clear(el, h("span.muted", "No dataset yet: "), h("a", { href: "#/datasets" }, "upload one"),
        h("span.muted", " to see real examples beside the renders."));
      return;
    }
    const stored = localStorage.getItem(CHOICE);
    for (const d of datasets) select.append(h("option", { value: d.id }, `${d.name} (${d.image_count} images)`));
    select.value = datasets.some((d) => d.id === stored) ? stored : datasets[0].id;
  }).catch((error) => clear(el, errorBox(error)));
  select.addEventListener("change", () => {
    localStorage.setItem(CHOICE, select.value);
    onChange(select.value);
  });
  return { el, ready, get value() { return select.value || ""; } };
}

/** GET api/exemplars: resolves with the answer, or null when no finished index holds the layer. */
export async function fetchExemplars(sha, dataset, layer, channel, { order = "max", k = 9 } = {}) {
  const params = new URLSearchParams({ model: sha, dataset, layer, channel: String(channel), order, k: String(k) });
  try {
    return await api.get(`api/exemplars?${params}`);
  } catch (error) {
    if (error.reason === "EXEMPLAR_INDEX_NOT_FOUND") return null;
    throw error;
  }
}

/** The best real image's value of the channel's spatial mean (the ratio's denominator), or null without an index. */
export async function bestMean(sha, dataset, layer, channel) {
  const answer = await fetchExemplars(sha, dataset, layer, channel, { order: "mean", k: 1 });
  return answer?.exemplars.length ? answer.exemplars[0].value : null;
}

/** The ratio as the pages show it: ×N.NN, with the tooltip and the exact number in data-ratio. */
export function ratioBadge(objective, best) {
  if (best === null || best === undefined || objective === null || objective === undefined) return null;
  const ratio = best > 0 ? objective / best : null;
  return h("span.ratio", { title: RATIO_TITLE, dataset: { ratio: ratio === null ? "" : String(ratio) } },
    ratio === null ? "ratio –" : `×${num(ratio, 2)}`);
}

/** A grid of crops (or a row: `row`); clicking one shows the whole image with the box. */
export function cropGrid(answer, { row = false } = {}) {
  return h(row ? "div.crops.row" : "div.crops", { dataset: { order: answer.order, count: answer.exemplars.length } },
    answer.exemplars.map((e) => {
      const img = h("img.crop", { src: e.crop_url, alt: e.name, loading: "lazy", dataset: { image: e.image,
        name: e.name } });
      const button = h("button.crop-button", { type: "button", title: `${e.name}: ${num(e.value)}` }, img);
      button.addEventListener("click", () => showWhole(e));
      return h("figure.example", { dataset: { rank: e.rank } }, button,
        row ? null : h("figcaption", h("span.value", num(e.value, 2))));
    }));
}

/** The whole image in a dialog, with the crop's box drawn over it (the box as fractions of the image). */
function showWhole(example) {
  let dialog = document.getElementById("exemplar-view");
  if (!dialog) {
    dialog = h("dialog#exemplar-view");
    dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
    document.body.append(dialog);
  }
  const img = h("img#exemplar-whole", { src: example.image_url, alt: example.name });
  const box = h("div.box#exemplar-box");
  const [x0, y0, x1, y1] = example.fraction || [0, 0, 1, 1];
  box.style.left = `${100 * x0}%`;
  box.style.top = `${100 * y0}%`;
  box.style.width = `${100 * (x1 - x0)}%`;
  box.style.height = `${100 * (y1 - y0)}%`;
  const close = h("button.subtle", { type: "button" }, "Close");
  close.addEventListener("click", () => dialog.close());
  const where = example.whole ? "the unit sees the whole image"
    : `box ${example.image_box ? example.image_box.join(", ") : "–"} (x0, y0, x1, y1 in the file's pixels)`;
  clear(dialog, h("div.whole", img, box),
    h("p.small", h("strong", example.name), ` · value ${num(example.value)} · ${where}`), h("div.actions", close));
  dialog.showModal();
}

/**
 * The examples of one channel beside a render: {el, show(order), ready} where order is "max" (top 9) or "min"
 * (bottom 9, beside a negative render). When the set has no index holding the layer, a button runs the index job
 * (this layer) with its progress, then shows the examples.
 */
export function examplesPanel(sha, layer, channel, chooser, { k = 9, onIndexed } = {}) {
  const title = h("h3", "Dataset examples");
  const body = h("div.examples-body");
  const el = h("aside.examples#examples", h("div.examples-head", title, chooser.el), body);
  let order = "max";
  let stop = () => {};

  async function show(wanted = order) {
    order = wanted;
    title.textContent = order === "min" ? `Bottom ${k} real images` : `Top ${k} real images`;
    await chooser.ready;
    if (!chooser.value) return clear(body);
    clear(body, h("p.muted.small", "Loading examples…"));
    try {
      const answer = await fetchExemplars(sha, chooser.value, layer, channel, { order, k });
      if (!answer) return clear(body, indexButton(sha, chooser.value, layer, (done) => { stop = done; }, () => {
        onIndexed?.();
        show();
      }));
      clear(body, cropGrid(answer), h("p.muted.small.examples-note", order === "min"
        ? "Lowest spatial max of the channel over the set." : "Highest spatial max of the channel over the set; "
          + "each crop is the unit's receptive field at its strongest position.",
      ` ${answer.images} images indexed.`));
    } catch (error) {
      clear(body, errorBox(error));
    }
    return undefined;
  }
  return { el, show, close: () => stop() };
}

/** "Index this set for LAYER": runs the index job, shows its progress (images done of the set's), then done(). */
export function indexButton(sha, dataset, layer, setStop, done) {
  const go = h("button.primary#run-index", { type: "button" }, "Index the dataset for this layer");
  const fill = h("span");
  const bar = h("div.bar#index-progress", { hidden: true }, fill);
  const line = h("div.small.muted#index-line", "No exemplar index of this dataset holds this layer yet: one pass "
    + "over its images finds every channel's strongest images.");
  const problem = h("div");
  go.addEventListener("click", async () => {
    go.disabled = true;
    clear(problem);
    try {
      const job = await api.post("api/exemplars/index", { model: sha, dataset, layers: [layer] });
      bar.hidden = false;
      line.textContent = "Indexing: queued…";
      const finish = (result) => {
        if (result.state === "SUCCEEDED") {
          fill.style.width = "100%";
          bar.classList.add("done");
          done();
          return;
        }
        go.disabled = false;
        clear(problem, errorBox(result.error || { code: result.state, message: `the index job ${result.state.toLowerCase()}` }));
      };
      if (["SUCCEEDED", "FAILED", "CANCELLED"].includes(job.state)) return finish(job); // a finished index reused
      setStop(watchJob(job.id, {
        progress: (p) => {
          fill.style.width = `${p.steps ? (100 * p.step) / p.steps : 0}%`;
          line.textContent = `Indexing: image ${p.step} of ${p.steps}…`;
        },
        result: finish,
        failure: async () => finish(await api.get(`api/jobs/${job.id}`)),
      }));
    } catch (error) {
      go.disabled = false;
      clear(problem, errorBox(error));
    }
    return undefined;
  });
  return h("div.index-needed", line, bar, h("div.form-actions", go, h("a.small", { href: route.jobs() }, "jobs")),
    problem);
}
