// A channel: a larger render with the CLI's options (steps, size, parameterization, transforms, a diversity
// batch, negative).
import { breadcrumbs, clear, h, route } from "../dom.js";
import { loadModel } from "./catalog.js";
import { jobPanel, optionsForm, previewEvery, submit } from "./render.js";
import { bestMean, datasetChooser, examplesPanel, ratioBadge } from "./examples.js";

export const DIVERSITY_WEIGHT = 100; // lucid's scale of the diversity term against a channel (featureviz.demo too)

/** The objective of the channel page. Negative minimises the channel; for an activation's output it goes
 *  through the pre-activation (`NAME:pre`), where a ReLU's zeros do not hide the negative side. */
export function channelObjective(layer, channel, { negative = false, diversity = false, preName = null } = {}) {
  const target = negative && preName ? preName : layer;
  let objective = { channel: { layer: target, channel } };
  if (negative) objective = { scale: { factor: -1, objective } };
  if (!diversity) return objective;
  return { sum: [objective, { scale: { factor: DIVERSITY_WEIGHT, objective: { diversity: { layer: target } } } }] };
}

export async function channelPage(root, [sha, name, channelText], state) {
  const { model, layers } = await loadModel(sha);
  const layer = layers.find((l) => l.name === name);
  const channel = Number(channelText);
  const crumbs = breadcrumbs(["Models", route.models()], [model.name, route.model(sha)],
    [name, route.layer(sha, name)], [`channel ${channel}`]);
  if (!layer || channel >= layer.channels) {
    root.append(crumbs, h("div.notice.bad", `No channel ${channel} in layer ${name}.`));
    return undefined;
  }
  // an activation's output: its input tensor is named "<this layer>:pre" (the importer's alias)
  const preName = layers.some((l) => l.pre_activation_of === layer.name) ? `${layer.name}:pre` : null;
  const side = Math.min(Math.max(...model.input.default_size, 64), state.info?.limits.max_image_side || 1024);
  const negative = h("input#negative", { type: "checkbox", name: "negative" });
  const diversity = h("input#diversity", { type: "checkbox", name: "diversity" });
  const options = optionsForm({ steps: 256, size: side, batch: 1 }, {
    declared: state.info?.options, batch: true,
    extra: [
      h("label.field.check", h("span", "negative"), h("span", negative, " minimise"),
        h("small", preName ? `through ${preName}` : "the channel's opposite")),
      h("label.field.check", h("span", "diversity"), h("span", diversity, " diverse batch"),
        h("small", "needs batch ≥ 2")),
    ],
  });
  if (!layer.spatial) diversity.disabled = true;
  const objectiveLine = h("code#objective-text");
  const go = h("button.primary#render-channel", { type: "submit" }, "Render");
  const where = h("div.render-side");
  let panel = null;
  let last = null; // the last finished render and whether it was the channel itself: its ratio follows the set
  const chooser = datasetChooser(() => {
    examples.show();
    if (last) showRatio(...last);
  });
  const examples = examplesPanel(sha, layer.name, channel, chooser);
  const ratioLine = h("div.ratio-line#channel-ratio");
  examples.el.append(ratioLine);

  function objective() {
    const batch = Number(options.inputs.batch.value);
    return channelObjective(layer.name, channel, { negative: negative.checked, preName,
      diversity: diversity.checked && batch > 1 });
  }
  function describe() {
    objectiveLine.textContent = JSON.stringify(objective());
  }
  for (const el of [negative, diversity, options.inputs.batch]) el.addEventListener("input", describe);
  negative.addEventListener("input", () => examples.show(negative.checked ? "min" : "max"));

  /** The activation ratio of a finished render of the channel itself (not negative, no diversity term): its best
   *  image's objective over the best real image's spatial mean. */
  async function showRatio(result, plain) {
    last = [result, plain];
    clear(ratioLine);
    const ends = (result.result?.images || []).map((i) => i.objective_end);
    if (!plain || result.state !== "SUCCEEDED" || !ends.length || !chooser.value) return;
    const best = await bestMean(sha, chooser.value, layer.name, channel).catch(() => null);
    const badge = ratioBadge(Math.max(...ends), best);
    if (badge) clear(ratioLine, h("span.muted", "activation ratio "), badge);
  }

  async function render(event) {
    event?.preventDefault();
    const values = options.values();
    go.disabled = true;
    const job = await submit({ model: sha, objective: objective(), preview_every: previewEvery(values.steps),
      preview_max_side: 256, ...values }, where);
    go.disabled = false;
    if (!job) return;
    panel?.close();
    const label = `${negative.checked ? "negative " : ""}channel ${channel}`;
    const plain = !negative.checked && !(diversity.checked && values.batch > 1);
    panel = jobPanel({ labels: Array.from({ length: values.batch }, (_, i) => values.batch > 1 ? `${label} · ${i + 1}` : label),
      large: true, onResult: (result) => showRatio(result, plain) });
    clear(where, panel.el);
    panel.follow(job);
  }

  const neighbours = h("div.neighbours",
    channel > 0 ? h("a.button.small", { href: route.channel(sha, name, channel - 1) }, `← channel ${channel - 1}`) : null,
    channel + 1 < layer.channels ? h("a.button.small", { href: route.channel(sha, name, channel + 1) }, `channel ${channel + 1} →`) : null);
  root.append(crumbs,
    h("div.page-head", h("h1", h("span.mono", layer.name), ` · channel ${channel}`),
      h("p.lead", `${layer.op_type} · ${layer.channels} channels`), neighbours),
    h("form.render-form#channel-form", { onsubmit: render }, options.el,
      h("div.form-actions", go, h("span.muted", "objective "), objectiveLine)),
    h("div.beside", where, examples.el));
  describe();
  examples.show();
  return () => { panel?.close(); examples.close(); };
}
