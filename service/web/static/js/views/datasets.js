// Datasets: image sets for the dataset examples. Drop a folder (its files go one by one, by relative name), image
// files, or a zip or tar archive, with a progress bar; the tenant's sets with their reports; delete.
import { api, archiveKind, uploadDataset } from "../api.js";
import { ago, bytes, clear, errorBox, h, shortSha, uploadsPage } from "../dom.js";

const CAUSES = {
  not_an_image: "not an image", corrupt: "corrupt or truncated", too_large: "too large",
  nested_archive: "archive inside the archive", duplicate: "duplicate bytes", encrypted: "encrypted",
};

export async function datasetsPage(root, _params, state) {
  await uploadsPage(root, {
    title: "Datasets", lead: "Upload a set of images; an exemplar index then finds each unit's strongest images in it.",
    listId: "dataset-list", noun: "datasets", empty: "No datasets yet: drop a folder of images or a zip above.",
    load: async () => (await api.get("api/datasets")).datasets, uploader: (done) => uploader(state, done),
    card: datasetCard,
  });
}

/** What a drop holds: {archive} for one zip or tar, else {files: [{name, file}]} (folders walked, by relative name;
 *  hidden files and folders left out, as the clients do). */
async function dropped(transfer) {
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length || entries.every((e) => e.isFile)) return fromFiles([...transfer.files].map((file) => ({
    name: file.name, file })));
  const files = [];
  if (entries.length === 1) { // one folder: its files by their paths inside it
    for (const child of await children(entries[0])) await walk(child, "", files);
    return { ...(await fromFiles(files)), folder: entries[0].name };
  }
  for (const entry of entries) await walk(entry, "", files); // several: each folder's name starts its files' names
  return fromFiles(files);
}

/** A folder entry's entries, by name (readEntries answers in batches until an empty one). */
async function children(folder) {
  const reader = folder.createReader();
  const all = [];
  for (;;) {
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) break;
    all.push(...batch);
  }
  return all.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

async function walk(entry, prefix, out) {
  if (entry.name.startsWith(".")) return;
  if (entry.isFile) {
    out.push({ name: prefix + entry.name, file: await new Promise((resolve, reject) => entry.file(resolve, reject)) });
    return;
  }
  for (const child of await children(entry)) await walk(child, `${prefix}${entry.name}/`, out);
}

/** One archive alone is sent as it is; anything else as single files. */
async function fromFiles(files) {
  files = files.filter((f) => !f.name.split("/").some((part) => part.startsWith(".")));
  if (files.length === 1 && await archiveKind(files[0].file)) return { archive: files[0].file };
  return { files };
}

function uploader(state, done) {
  const input = h("input#dataset-files", { type: "file", multiple: true, hidden: true });
  const folderInput = h("input#dataset-folder", { type: "file", webkitdirectory: true, hidden: true });
  const bar = h("div.bar", h("span"));
  const status = h("div.upload-status", { hidden: true }, h("div.upload-line"), bar);
  const message = h("div");
  const limits = state.info?.limits || {};
  const zone = h("div.dropzone#dataset-dropzone", { tabindex: 0, role: "button" },
    h("div.drop-icon", "⇪"),
    h("div", h("strong", "Drop a folder of images, or a zip or tar, here"), " or ",
      h("span.linkish#choose-files", "choose files"), " or ",
      h("span.linkish#choose-folder", "a folder")),
    h("div.muted.small", "PNG, JPEG, GIF, BMP and WebP; other files are skipped and listed"
      + (limits.max_dataset_bytes ? `; up to ${limits.max_dataset_images} images, ${bytes(limits.max_dataset_bytes)}.`
        : ".")));

  zone.addEventListener("click", (e) => (e.target.id === "choose-folder" ? folderInput : input).click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const what = await dropped(e.dataTransfer);
    send(what, what.folder || (what.archive ? what.archive.name : ""));
  });
  input.addEventListener("change", async () => {
    const files = [...input.files].map((file) => ({ name: file.name, file }));
    input.value = "";
    if (files.length) send(await fromFiles(files), files.length === 1 ? files[0].name : "");
  });
  folderInput.addEventListener("change", () => {
    // webkitRelativePath is "<folder>/<path inside it>": the set's names are the paths inside the folder
    const chosen = [...folderInput.files];
    folderInput.value = "";
    if (!chosen.length) return;
    const folder = chosen[0].webkitRelativePath.split("/")[0];
    const files = chosen.map((file) => ({ name: file.webkitRelativePath.split("/").slice(1).join("/"), file }))
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    fromFiles(files).then((what) => send(what, folder));
  });

  async function send(what, name) {
    clear(message);
    const count = what.archive ? 1 : what.files.length;
    if (!count) {
      clear(message, errorBox({ code: "INVALID_ARGUMENT", message: "nothing to upload: the drop held no files" }));
      return;
    }
    const size = what.archive ? what.archive.size : what.files.reduce((sum, f) => sum + f.file.size, 0);
    const label = `${name || "the set"} (${what.archive ? "archive" : `${count} file${count === 1 ? "" : "s"}`}, `
      + `${bytes(size)})`;
    status.hidden = false;
    status.classList.remove("done");
    const line = status.querySelector(".upload-line");
    const fill = bar.firstChild;
    line.textContent = `Uploading ${label}…`;
    fill.style.width = "0%";
    bar.classList.remove("busy", "done");
    try {
      const dataset = await uploadDataset({ ...what, name }, {
        onHashing: (doneBytes, total) => {
          line.textContent = `Checksumming ${label} (${Math.round((100 * doneBytes) / Math.max(total, 1))}%)…`;
        },
        onProgress: (sent, total) => {
          line.textContent = `Uploading ${label}…`;
          fill.style.width = `${Math.round((100 * sent) / Math.max(total, 1))}%`;
          if (sent >= total) {
            line.textContent = `Checking ${label}: unpacking and reading every image's header…`;
            bar.classList.add("busy");
          }
        },
      });
      bar.classList.remove("busy");
      bar.classList.add("done");
      fill.style.width = "100%";
      status.classList.add("done");
      const skipped = dataset.report.skipped;
      line.textContent = dataset.deduplicated
        ? `${dataset.name} was already here (the same images).`
        : `Uploaded ${dataset.name}: ${dataset.image_count} image${dataset.image_count === 1 ? "" : "s"}`
          + (skipped ? `, ${skipped} file${skipped === 1 ? "" : "s"} skipped.` : ".");
      done();
    } catch (error) {
      status.hidden = true;
      clear(message, errorBox(error));
    }
  }

  return h("section.upload", zone, input, folderInput, status, message);
}

function report(dataset) {
  const r = dataset.report;
  const rows = [];
  for (const s of r.skipped_by_cause) {
    rows.push(h("li.skipped", { dataset: { cause: s.cause } },
      h("strong", `${s.count} skipped: ${CAUSES[s.cause] || s.cause}`),
      s.names.length ? [" — ", names(s.names, s.count)] : null,
      s.detail ? h("div.muted.small", s.detail) : null));
  }
  for (const c of r.converted) {
    rows.push(h("li.converted", { dataset: { kind: c.kind } },
      `${c.count} converted from ${c.kind.replace("_", "-")}`,
      c.names.length ? [" — ", names(c.names, c.count)] : null));
  }
  return rows.length ? h("ul.report", rows) : h("p.muted.small.report", "Every file is an image; nothing skipped.");
}

function names(list, count) {
  return [list.map((n, i) => [i ? ", " : "", h("code", n)]), count > list.length ? ` and ${count - list.length} more`
    : ""];
}

function datasetCard(dataset, refresh) {
  const deleteButton = h("button.danger.subtle", { type: "button" }, "Delete");
  deleteButton.addEventListener("click", async () => {
    if (!deleteButton.classList.contains("armed")) { // a second click confirms
      deleteButton.classList.add("armed");
      deleteButton.textContent = "Really delete?";
      return;
    }
    deleteButton.disabled = true;
    try {
      await api.del(`api/datasets/${dataset.id}`);
      refresh();
    } catch (error) {
      deleteButton.replaceWith(errorBox(error));
    }
  });
  const formats = Object.entries(dataset.report.formats).map(([f, n]) => `${n} ${f}`).join(", ");
  return h("article.card.dataset", { dataset: { id: dataset.id } },
    h("div.card-head", h("h3", dataset.name), h("span.pill", `${dataset.image_count} images`)),
    h("dl.facts",
      h("dt", "images"), h("dd.images", `${dataset.image_count} of ${dataset.report.files} files`),
      h("dt", "size"), h("dd", bytes(dataset.size_bytes)),
      h("dt", "formats"), h("dd", formats || "–"),
      h("dt", "id"), h("dd", h("code", { title: dataset.id }, shortSha(dataset.id))),
      h("dt", "added"), h("dd", ago(dataset.create_time))),
    report(dataset),
    h("div.card-actions", h("span.spacer"), deleteButton));
}
