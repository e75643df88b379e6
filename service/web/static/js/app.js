// The explorer's shell: the hash router, the sign-in dialog and the server line in the top bar.
import { api, onUnauthenticated } from "./api.js";
import { clear, errorBox, h } from "./dom.js";
import { modelsPage } from "./views/models.js";
import { catalogPage } from "./views/catalog.js";
import { layerPage } from "./views/layer.js";
import { channelPage } from "./views/channel.js";
import { classesPage } from "./views/classes.js";
import { jobPage, jobsPage } from "./views/jobs.js";
import { datasetsPage } from "./views/datasets.js";
import { atlasesPage, atlasPage, unitPage } from "./views/atlas.js";

const view = document.getElementById("view");
const session = document.getElementById("session");
const dialog = document.getElementById("login");
let cleanup = () => {};
export const state = { info: null };

// [pattern, page, nav section]; a page is (root, params) => cleanup function
const ROUTES = [
  [/^#?\/?$/, modelsPage, "models"],
  [/^#\/models$/, modelsPage, "models"],
  [/^#\/models\/([0-9a-f]{64})$/, catalogPage, "models"],
  [/^#\/models\/([0-9a-f]{64})\/classes$/, classesPage, "models"],
  [/^#\/models\/([0-9a-f]{64})\/layers\/([^/]+)$/, layerPage, "models"],
  [/^#\/models\/([0-9a-f]{64})\/layers\/([^/]+)\/channels\/(\d+)$/, channelPage, "models"],
  [/^#\/datasets$/, datasetsPage, "datasets"],
  [/^#\/jobs$/, jobsPage, "jobs"],
  [/^#\/jobs\/([\w-]+)$/, jobPage, "jobs"],
  [/^#\/atlas$/, atlasesPage, "atlas"],
  [/^#\/atlas\/([\w-]+)(?:\/layer\/(\d+))?$/, atlasPage, "atlas"],
  [/^#\/atlas\/([\w-]+)\/unit\/([0-9a-f]{64})$/, unitPage, "atlas"],
];

async function show() {
  cleanup();
  cleanup = () => {};
  const hash = location.hash || "#/models";
  for (const [pattern, page, section] of ROUTES) {
    const match = hash.match(pattern);
    if (!match) continue;
    document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === section));
    const root = clear(view);
    try {
      cleanup = (await page(root, match.slice(1).map((p) => (p === undefined ? p : decodeURIComponent(p))), state)) || (() => {});
    } catch (error) {
      if (error.status !== 401) clear(root, errorBox(error));
    }
    return;
  }
  clear(view, h("div.empty", h("h2", "Nothing here"), h("p", "No page has this address. ", h("a", { href: "#/models" }, "Go to the models."))));
}

function showSession(info) {
  state.info = info;
  const device = [info.device.kind, info.device.name].filter(Boolean).join(" · ");
  clear(session,
    h("span.device", { title: `featureviz ${info.version}, ${info.device.kernels} kernels` }, device),
    h("span.tenant", { title: "your tenant on this server" }, info.tenant),
    info.auth_required ? h("button.link#logout", { onclick: logout }, "Sign out") : null);
}

async function logout() {
  await api.post("api/logout");
  state.info = null;
  clear(session);
  askToken();
}

function askToken() {
  if (dialog.open) return;
  document.getElementById("login-error").textContent = "";
  clear(view, h("div.empty", h("h2", "Sign in to continue"), h("p", "This server needs a token.")));
  dialog.showModal();
  document.getElementById("login-token").focus();
}

document.getElementById("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("login-token");
  const message = document.getElementById("login-error");
  message.textContent = "";
  try {
    showSession(await api.post("api/login", { token: input.value }));
    input.value = "";
    dialog.close();
    show();
  } catch (error) {
    message.textContent = error.status === 401
      ? "Refused: the server does not know this token."
      : `${error.code}: ${error.message}`;
  }
});
dialog.addEventListener("cancel", (event) => event.preventDefault()); // nothing to see without a token

onUnauthenticated(askToken);
window.addEventListener("hashchange", show);

(async () => {
  try {
    showSession(await api.get("api/info"));
  } catch (error) {
    if (error.status === 401) return; // the dialog is open
    clear(view, errorBox(error));
    return;
  }
  show();
})();
