// Jobs: the tenant's newest jobs with state and progress, refreshed while any is active; cancel; one job's page.
import { api } from "../api.js";
import { ago, breadcrumbs, clear, errorBox, h, route, shortSha } from "../dom.js";
import { jobPanel } from "./render.js";

const ACTIVE = new Set(["QUEUED", "RUNNING"]);
const POLL_ACTIVE_MS = 1000;
const POLL_IDLE_MS = 5000;

export async function jobsPage(root) {
  const body = h("tbody");
  const note = h("p.muted");
  let timer = null;
  let closed = false;

  async function refresh() {
    let jobs;
    try {
      ({ jobs } = await api.get("api/jobs"));
    } catch (error) {
      if (error.status !== 401) clear(note, errorBox(error));
      return;
    }
    if (closed) return;
    note.textContent = jobs.length ? "" : "No jobs yet. Render a layer, a channel or a class to start one.";
    clear(body, jobs.map((job) => jobRow(job, refresh)));
    timer = setTimeout(refresh, jobs.some((j) => ACTIVE.has(j.state)) ? POLL_ACTIVE_MS : POLL_IDLE_MS);
  }

  root.append(
    h("div.page-head", h("h1", "Jobs"), h("p.lead", "Your newest renders. A job keeps running when you leave its page.")),
    h("table.jobs#job-table", h("thead", h("tr", h("th", "job"), h("th", "objective"), h("th", "state"),
      h("th", "progress"), h("th", "created"), h("th", ""))), body),
    note);
  await refresh();
  return () => { closed = true; clearTimeout(timer); };
}

function jobRow(job, refresh) {
  const pct = job.steps ? Math.round((100 * job.step) / job.steps) : 0;
  const cancel = ACTIVE.has(job.state)
    ? h("button.subtle.cancel", { type: "button", onclick: async (e) => {
      e.target.disabled = true;
      try { await api.post(`api/jobs/${job.id}/cancel`); } catch (error) { e.target.replaceWith(errorBox(error)); }
      refresh();
    } }, "Cancel") : null;
  const batch = job.spec.batch > 1 ? ` · ${job.spec.batch} images` : "";
  return h("tr", { dataset: { job: job.id, state: job.state } },
    h("td", h("a.mono", { href: route.job(job.id) }, job.id.slice(0, 8))),
    h("td.objective", h("div.summary", { title: job.objective_text }, job.summary),
      h("small.muted", `${job.model_name || shortSha(job.spec.model)}${batch}`)),
    h("td", h(`span.state.${job.state.toLowerCase()}`, job.state.toLowerCase())),
    h("td.progress-cell", h("div.bar.thin", h("span", { style: `width:${pct}%` })), h("small", `${job.step}/${job.steps}`)),
    h("td.muted", ago(job.create_time)),
    h("td", cancel));
}

export async function jobPage(root, [id]) {
  const job = await api.get(`api/jobs/${id}`);
  const model = job.spec.model;
  const panel = jobPanel({ large: (job.spec.batch || 1) <= 2 });
  root.append(
    breadcrumbs(["Jobs", route.jobs()], [`job ${id}`]),
    h("div.page-head", h("h1", "Job ", h("span.mono", id)),
      h("p.lead", job.summary),
      job.summary !== job.objective_text ? h("details.objective", h("summary", "objective spec"),
        h("code.wrap", job.objective_text)) : null,
      h("p.muted", "model ", h("a", { href: route.model(model) }, shortSha(model)),
        ` · ${job.spec.steps} steps · batch ${job.spec.batch} · seed ${job.spec.seed}`
        + (job.spec.size ? ` · ${job.spec.size.join("×")} px` : ""))),
    panel.el);
  panel.follow(job);
  return () => panel.close();
}
