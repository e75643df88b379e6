// Classes: for a model whose logits are ImageNet-1k's, pick classes by name and render them as one batch.
import { api } from "../api.js";
import { breadcrumbs, clear, h, route } from "../dom.js";
import { isImageNet, loadModel } from "./catalog.js";
import { jobPanel, optionsForm, previewEvery, submit } from "./render.js";

const SUGGESTIONS = ["goldfish", "flamingo", "tabby cat", "volcano", "daisy", "lemon", "jellyfish", "pizza"];

/** Image i maximises the logit of classes[i]. */
export function classesObjective(indices) {
  return { sum: indices.map((k, i) => ({ batch: { index: i, objective: { logit: { index: k } } } })) };
}

export async function classesPage(root, [sha], state) {
  const { model, layers } = await loadModel(sha);
  const crumbs = breadcrumbs(["Models", route.models()], [model.name, route.model(sha)], ["Classes"]);
  if (!isImageNet(model, layers)) {
    root.append(crumbs, h("div.notice", "This model's logits are not ImageNet-1k's (1000 classes), so its classes have "
      + "no names here. Render its logit layer's channels from the ", h("a", { href: route.model(sha) }, "layer catalog"), "."));
    return undefined;
  }
  const { names } = await api.get("api/classes");
  const limits = state.info?.limits || {};
  const maxImages = Math.min(limits.max_images_per_job || limits.max_batch || 64, 16);  // max_batch: the old name
  const chosen = [];
  const search = h("input#class-search", { type: "search", placeholder: "Search 1000 ImageNet classes, e.g. cat" });
  const matches = h("div.class-matches");
  const picked = h("div.chips#chosen-classes");
  const options = optionsForm({ steps: 128, size: Math.min(160, state.info?.limits.max_image_side || 1024) },
    { declared: state.info?.options });
  const go = h("button.primary#render-classes", { type: "submit" }, "Render classes");
  const where = h("div");
  let panel = null;

  function showMatches() {
    const q = search.value.trim().toLowerCase();
    const found = q ? names.map((n, k) => [n, k]).filter(([n]) => n.toLowerCase().includes(q)).slice(0, 40)
      : SUGGESTIONS.map((s) => [s, names.indexOf(s)]).filter(([, k]) => k >= 0);
    clear(matches, found.length ? found.map(([n, k]) => h("button.chip", { type: "button", dataset: { index: k },
      onclick: () => add(k) }, n, h("small", ` ${k}`))) : h("span.muted", "no class matches"));
  }
  function add(k) {
    if (chosen.includes(k) || chosen.length >= maxImages) return;
    chosen.push(k);
    showPicked();
  }
  function showPicked() {
    go.disabled = !chosen.length;
    go.textContent = chosen.length ? `Render ${chosen.length} class${chosen.length > 1 ? "es" : ""}` : "Render classes";
    clear(picked, chosen.length ? chosen.map((k) => h("button.chip.on", { type: "button", title: "remove",
      onclick: () => { chosen.splice(chosen.indexOf(k), 1); showPicked(); } }, names[k], " ×"))
      : h("span.muted", `Pick up to ${maxImages} classes.`));
  }
  search.addEventListener("input", showMatches);

  async function render(event) {
    event.preventDefault();
    if (!chosen.length) return;
    const values = options.values();
    go.disabled = true;
    const job = await submit({ model: sha, objective: classesObjective(chosen), batch: chosen.length,
      preview_every: previewEvery(values.steps), preview_max_side: 160, ...values }, where);
    go.disabled = false;
    if (!job) return;
    panel?.close();
    panel = jobPanel({ labels: chosen.map((k) => `${names[k]} (${k})`) });
    clear(where, panel.el);
    panel.follow(job);
  }

  root.append(crumbs,
    h("div.page-head", h("h1", "ImageNet classes"),
      h("p.lead", `Images that ${model.name} takes for a class: each maximises the class's logit (`,
        h("code", model.logits_layer), ").")),
    h("form.render-form#classes-form", { onsubmit: render },
      h("label.grow", search), matches, h("div.picked", h("strong", "Chosen: "), picked),
      options.el, h("div.form-actions", go)),
    where);
  showMatches();
  showPicked();
  return () => panel?.close();
}
