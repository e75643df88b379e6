// Models: drag-and-drop upload with a progress bar, the tenant's models, delete.
import { api, uploadModel } from "../api.js";
import { ago, bytes, clear, errorBox, h, route, shortSha, uploadsPage } from "../dom.js";

export async function modelsPage(root, _params, state) {
  await uploadsPage(root, {
    title: "Models", lead: "Upload an ONNX vision model, then browse its layers and watch its features appear.",
    listId: "model-list", noun: "models", empty: "No models yet: drop an .onnx file above.",
    load: async () => (await api.get("api/models")).models, uploader: (done) => uploader(state, done), card: modelCard,
  });
}

function uploader(state, done) {
  const input = h("input#file-input", { type: "file", accept: ".onnx", hidden: true });
  const bar = h("div.bar", h("span"));
  const status = h("div.upload-status", { hidden: true }, h("div.upload-line"), bar);
  const message = h("div");
  const mean = h("input", { name: "mean", placeholder: "0.485,0.456,0.406", size: 18 });
  const std = h("input", { name: "std", placeholder: "0.229,0.224,0.225", size: 18 });
  const bgr = h("input", { type: "checkbox", name: "bgr" });
  const zone = h("div.dropzone#dropzone", { tabindex: 0, role: "button" },
    h("div.drop-icon", "⇪"),
    h("div", h("strong", "Drop an ONNX model here"), " or ", h("span.linkish", "choose a file")),
    h("div.muted.small", `Checked against onnxruntime on upload; up to ${bytes(state.info?.limits.max_upload_bytes || 0)}.`));
  const advanced = h("details.advanced",
    h("summary", "Input preprocessing (optional)"),
    h("p.muted.small", "The model's input = (image − mean) / std, for images in [0, 1]. Leave empty for the default."),
    h("div.row", h("label", "mean ", mean), h("label", "std ", std), h("label.check", bgr, " BGR channel order")));

  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => { if (input.files.length) send(input.files[0]); input.value = ""; });

  async function send(file) {
    clear(message);
    status.hidden = false;
    status.classList.remove("done");
    const line = status.querySelector(".upload-line");
    const fill = bar.firstChild;
    line.textContent = `Uploading ${file.name} (${bytes(file.size)})…`;
    fill.style.width = "0%";
    bar.classList.remove("busy");
    const preprocess = mean.value || std.value ? { mean: mean.value, std: std.value, bgr: bgr.checked } : null;
    try {
      const model = await uploadModel(file, {
        preprocess,
        onHashing: (done, total) => {
          line.textContent = `Checksumming ${file.name} (${Math.round((100 * done) / Math.max(total, 1))}%)…`;
        },
        onProgress: (sent, total) => {
          line.textContent = `Uploading ${file.name} (${bytes(file.size)})…`;
          fill.style.width = `${Math.round((100 * sent) / Math.max(total, 1))}%`;
          if (sent >= total) {
            line.textContent = `Importing ${file.name}: converting to torch and checking against onnxruntime…`;
            bar.classList.add("busy");
          }
        },
      });
      bar.classList.remove("busy");
      fill.style.width = "100%";
      status.classList.add("done");
      line.textContent = model.deduplicated
        ? `${model.name} was already here (same bytes).`
        : `Uploaded ${model.name}: ${model.layer_count} layers, ready.`;
      done();
    } catch (error) {
      status.hidden = true;
      clear(message, errorBox(error));
    }
  }

  return h("section.upload", zone, input, status, message, advanced);
}

function modelCard(model, refresh) {
  const input = model.input;
  const size = input.height ? `${input.channels} × ${input.height} × ${input.width}`
    : `${input.channels} × ${input.default_size.join(" × ")} (any size)`;
  const deleteButton = h("button.danger.subtle", { type: "button" }, "Delete");
  deleteButton.addEventListener("click", async () => {
    if (!deleteButton.classList.contains("armed")) { // a second click confirms
      deleteButton.classList.add("armed");
      deleteButton.textContent = "Really delete?";
      return;
    }
    deleteButton.disabled = true;
    try {
      await api.del(`api/models/${model.sha256}`);
      refresh();
    } catch (error) {
      deleteButton.replaceWith(errorBox(error));
    }
  });
  const check = model.check.passed
    ? h("span.pill.good", { title: "torch vs onnxruntime, largest relative error" }, `✓ ${model.check.max_rel_err.toExponential(1)}`)
    : h("span.pill", "unchecked");
  return h("article.card.model", { dataset: { sha: model.sha256 } },
    h("div.card-head",
      h("h3", h("a", { href: route.model(model.sha256) }, model.name)),
      check),
    h("dl.facts",
      h("dt", "input"), h("dd", size),
      h("dt", "layers"), h("dd", String(model.layer_count)),
      h("dt", "logits"), h("dd", model.logits_layer ? [h("code", model.logits_layer),
        ` ${model.logits_channels} classes${model.logits_channels === 1000 ? " (ImageNet)" : ""}`] : "–"),
      h("dt", "file"), h("dd", `${bytes(model.size_bytes)} · `, h("code", { title: model.sha256 }, shortSha(model.sha256))),
      h("dt", "added"), h("dd", ago(model.create_time))),
    h("div.card-actions",
      h("a.button.primary", { href: route.model(model.sha256) }, "Browse layers"),
      model.logits_channels === 1000 ? h("a.button", { href: route.classes(model.sha256) }, "Classes") : null,
      h("span.spacer"),
      deleteButton));
}
