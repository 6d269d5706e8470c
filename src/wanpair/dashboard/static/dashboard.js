// wanpair dashboard: the queue, a new run's form, the runs list, and one run's two experts side by side (a Wan 2.1
// run: its one model), growing live. Every request carries the token from the page's URL: in a header, or (images,
// videos, downloads, which cannot send headers) in the URL.
"use strict";

const COLORS = { high: "#d62728", low: "#1f77b4", full: "#9467bd" };
const NAMES = { high: "high-noise", low: "low-noise", full: "full-range" };
const state = { runId: null, offset: 0, file: "", rows: [], timers: [], facts: null };

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") e.onclick = v; else e.setAttribute(k, v);
  }
  for (const kid of kids) e.append(kid);
  return e;
};

function duration(s) {
  if (s === null || s === undefined) return "—";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// the run's experts as the server lists them: high and low, or "full" (one model over all timesteps)
const experts = () => (state.facts ? Object.keys(state.facts.experts) : ["high", "low"]);

function stepsText(p) {
  return p.total ? `${p.done} of ${p.total}` : (p.done ? `${p.done}` : "—");
}

// the token `wanpair dashboard` printed in the URL (as Jupyter does); sent in a header, never kept in a cookie
const TOKEN = new URLSearchParams(location.search).get("token") || "";
// a file's URL for an <img>, <video> or download link: these cannot send the header
const withToken = (url) => `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(TOKEN)}`;

async function getJSON(url) {
  const r = await fetch(url, { headers: { "X-Wanpair-Token": TOKEN } });
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || `${url}: ${r.status}`);
  return r.json();
}

async function post(url, body = {}) {
  const r = await fetch(url, { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-Wanpair-Token": TOKEN } });
  const got = await r.json().catch(() => ({}));
  if (!r.ok) throw Object.assign(new Error(got.error || `${url}: ${r.status}`), { confirm: got.confirm });
  return got;
}

// a POST the user asked for; a refusal is shown, a file that would be replaced is asked about first
async function act(url, body, asked = false) {
  try {
    return await post(url, body);
  } catch (e) {
    if (e.confirm && !asked && confirm(e.message)) return act(url, { ...body, replace: true }, true);
    if (!e.confirm) alert(e.message);
    return null;
  }
}

// ---------------------------------------------------------------- the runs list
async function loadRuns() {
  const runs = await getJSON("/api/runs");
  const body = $("#runs tbody");
  body.replaceChildren(...runs.map((r) => el("tr", { class: `state-${r.state}`, "data-run": r.id, onclick: () => openRun(r.id) },
    el("td", {}, r.name), el("td", { class: "state" }, r.state),
    ...(r.experts.full ? [el("td", { colspan: 2 }, `${stepsText(r.experts.full)} (one model)`)]
                       : [el("td", {}, stepsText(r.experts.high)), el("td", {}, stepsText(r.experts.low))]),
    el("td", {}, r.state === "running" ? duration(r.eta_s) : "—"),
    el("td", {}, r.started ? new Date(r.started * 1000).toLocaleString() : "—"),
    el("td", {}, r.device || "—"))));
  if (!runs.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 7 }, "No runs found (a run is a folder with metrics.jsonl).")));
}

// ---------------------------------------------------------------- one run
function openRun(id) {
  location.hash = `run=${id}`;
}

async function showRun(id) {
  for (const t of state.timers) clearInterval(t);
  Object.assign(state, { runId: id, offset: 0, file: "", rows: [] });
  $("#run").hidden = false;
  await refreshFacts();
  await pollMetrics();
  state.timers = [setInterval(pollMetrics, 2000), setInterval(refreshFacts, 10000)];
}

async function refreshFacts() {
  const run = await getJSON(`/api/runs/${state.runId}`);
  state.facts = run;
  $("#run-title").textContent = `${run.name} — ${run.state}`;
  $("#run-facts").replaceChildren(
    ...experts().map((e) => el("span", { id: `progress-${e}`, class: `progress ${e}` },
      `${NAMES[e]}: ${stepsText(run.experts[e])} steps · ${run.experts[e].s_per_step ? run.experts[e].s_per_step.toFixed(3) : "—"} s/step · ETA ${duration(run.experts[e].eta_s)}`)),
    el("span", {}, ` · ${run.device || ""} · ${run.folder}`));
  renderSamples(run.samples);
  renderLoras(run.loras, run.project);
  $("#run-log").textContent = run.log.length ? run.log.join("\n") : "No log: this run was not started by this dashboard.";
}

async function pollMetrics() {
  const got = await getJSON(`/api/runs/${state.runId}/metrics?offset=${state.offset}&file=${encodeURIComponent(state.file)}`);
  Object.assign(state, { offset: got.offset, file: got.file });
  if (got.reset) state.rows = [];  // a resume rewrote metrics.jsonl without the killed run's last rows: start again
  if (got.rows.length || !state.rows.length || got.reset) {
    state.rows.push(...got.rows);
    renderCharts();
    updateProgress();
  }
}

function updateProgress() {  // steps done, between the slower refreshes of the facts
  for (const e of experts()) {
    const steps = state.rows.filter((r) => r.expert === e && "loss" in r);
    const node = document.getElementById(`progress-${e}`);
    if (!node || !steps.length || !state.facts) continue;
    const total = state.facts.experts[e].total;
    const done = steps[steps.length - 1].step;
    node.textContent = node.textContent.replace(/^[^:]+: [^s]+ steps/, `${NAMES[e]}: ${total ? `${done} of ${total}` : done} steps`);
  }
}

function series(expert, key) {
  const rows = state.rows.filter((r) => r.expert === expert && key in r);
  return { x: rows.map((r) => r.step), y: rows.map((r) => r[key]) };
}

function windows() {
  const out = { high: [875, 1000], low: [0, 875], full: [0, 1000] };
  for (const l of (state.facts && state.facts.loras) || []) {
    if (l.expert && l.window) out[l.expert] = l.window.split(",").map(Number);
  }
  return out;
}

const LAYOUT = { margin: { l: 50, r: 10, t: 36, b: 90 }, legend: { orientation: "h", y: -0.3 }, hovermode: "closest" };

function renderCharts() {
  const loss = [], byT = [], lr = [], speed = [], mem = [];
  for (const e of experts()) {
    const c = COLORS[e];
    loss.push({ ...series(e, "loss"), name: `${NAMES[e]} loss`, mode: "markers", marker: { color: c, size: 4, opacity: 0.35 } });
    loss.push({ ...series(e, "smoothed_loss"), name: `${NAMES[e]} smoothed`, mode: "lines", line: { color: c } });
    loss.push({ ...series(e, "val_loss"), name: `${NAMES[e]} validation`, mode: "lines+markers", line: { color: c, dash: "dash" } });
    const rows = state.rows.filter((r) => r.expert === e && "timestep" in r);
    byT.push({ x: rows.map((r) => r.timestep), y: rows.map((r) => r.loss), name: NAMES[e], mode: "markers", marker: { color: c, size: 4 } });
    lr.push({ ...series(e, "lr"), name: NAMES[e], mode: "lines", line: { color: c } });
    speed.push({ ...series(e, "s_per_step"), name: NAMES[e], mode: "lines", line: { color: c } });
    mem.push({ ...series(e, "gpu_mem_gib"), name: NAMES[e], mode: "lines", line: { color: c } });
  }
  const w = windows();
  const shapes = experts().map((e) => ({ type: "rect", xref: "x", yref: "paper", x0: w[e][0], x1: w[e][1], y0: 0, y1: 1,
    fillcolor: COLORS[e], opacity: 0.08, line: { width: 0 } }));
  const cfg = { displaylogo: false, displayModeBar: false, responsive: true };
  const t = (text) => ({ text });  // Plotly 3 wants titles as objects
  const axis = (text, extra = {}) => ({ title: t(text), ...extra });
  Plotly.react("chart-loss", loss, { ...LAYOUT, title: t("loss against step"), xaxis: axis("step"), yaxis: axis("loss") }, cfg);
  Plotly.react("chart-timestep", byT, { ...LAYOUT, title: t("loss against timestep (shaded: each expert's window)"),
    xaxis: axis("timestep", { range: [0, 1000] }), yaxis: axis("loss"), shapes }, cfg);
  Plotly.react("chart-lr", lr, { ...LAYOUT, title: t("learning rate"), xaxis: axis("step") }, cfg);
  Plotly.react("chart-speed", speed, { ...LAYOUT, title: t("seconds per step"), xaxis: axis("step") }, cfg);
  const noGpu = mem.every((trace) => !trace.x.length);
  Plotly.react("chart-memory", mem, { ...LAYOUT, title: t(noGpu ? "GPU memory: none recorded (a CPU run)" : "GPU memory (GiB, peak allocated)"),
    xaxis: axis("step") }, cfg);
}

function media(s, big) {
  const src = withToken(`/files/${state.runId}/${s.file.split("/").map(encodeURIComponent).join("/")}`);
  return s.video ? el("video", { src, controls: "", muted: "", loop: "", ...(big ? { autoplay: "" } : {}) })
                 : el("img", { src, alt: s.prompt, loading: "lazy" });
}

function renderSamples(samples) {
  const box = $("#samples");
  if (!samples.length) return;
  const prompts = [...new Set(samples.map((s) => s.prompt))];
  const cols = [...new Set(samples.map((s) => `${s.expert}|${s.step}`))]
    .sort((a, b) => Number(a.split("|")[1]) - Number(b.split("|")[1]) || a.localeCompare(b));
  const head = el("tr", {}, el("th", {}, "prompt"), ...cols.map((c) => {
    const [e, step] = c.split("|");
    return el("th", {}, e === "null" ? "" : `${NAMES[e] || e} · step ${step}`);
  }));
  const rows = prompts.map((p) => el("tr", {}, el("th", { class: "prompt" }, p), ...cols.map((c) => {
    const cell = el("td");
    for (const s of samples.filter((s) => s.prompt === p && `${s.expert}|${s.step}` === c)) {
      cell.append(el("figure", { class: "sample", onclick: () => enlarge(s) }, media(s, false), el("figcaption", {}, s.combination)));
    }
    return cell;
  })));
  box.replaceChildren(el("table", { class: "grid" }, el("thead", {}, head), el("tbody", {}, ...rows)));
}

function enlarge(s) {
  $("#viewer-body").replaceChildren(media(s, true), el("p", {}, `${s.prompt} — ${s.combination}`));
  $("#viewer").hidden = false;
}

function renderLoras(loras, project) {
  const body = $("#loras tbody");
  const chosen = {};
  for (const input of document.querySelectorAll("#loras input:checked")) chosen[input.name] = input.value;
  body.replaceChildren(...loras.map((l) => {
    const radio = el("input", { type: "radio", name: `use-${l.expert}`, value: l.path });
    const isFinal = !/-(step|partial-step)\d+\.safetensors$/.test(l.file);
    radio.checked = chosen[`use-${l.expert}`] ? chosen[`use-${l.expert}`] === l.path : isFinal;
    radio.onchange = () => command(project);
    const file = el("a", { href: withToken(`/api/runs/${state.runId}/lora/${encodeURIComponent(l.file)}`), download: l.file }, l.file);
    return el("tr", { class: l.partial ? "partial" : "" }, el("td", {}, l.expert ? radio : ""), el("td", {}, file),
      el("td", {}, l.expert || "?"), el("td", {}, l.window || ""), el("td", {}, l.rank || ""), el("td", {}, l.steps || ""),
      el("td", {}, l.val_loss || ""), el("td", { class: "mono" }, l.base || ""), el("td", {}, String(l.size_mb)));
  }));
  command(project);
}

function command(project) {
  const pick = (e) => { const c = document.querySelector(`#loras input[name=use-${e}]:checked`); return c ? c.value : null; };
  const parts = ["wanpair sample", project || "wanpair.toml"];
  for (const e of experts()) { const p = pick(e); if (p) parts.push(`${e === "full" ? "--lora" : `--lora-${e}`} ${p}`); }
  parts.push('--prompt "..."');
  $("#sample-command").textContent = parts.join(" ");
}

// ---------------------------------------------------------------- the queue
const ENDED = ["finished", "stopped", "failed", "interrupted"];

async function loadJobs() {
  const jobs = await getJSON("/api/jobs");
  const body = $("#jobs tbody");
  const button = (label, url) => el("button", { class: `job-${label}`, onclick: async (ev) => {
    ev.stopPropagation(); await act(url, {}); loadJobs(); } }, label);
  body.replaceChildren(...jobs.map((j) => el("tr", { class: `state-${j.state}`, "data-job": j.id,
      onclick: () => { if (j.run) openRun(j.run); } },
    el("td", {}, j.title), el("td", { class: "state" }, j.state + (j.state === "running" && !j.owned ? " (started by an earlier dashboard)" : "") + (j.state === "held" ? " (queued before the dashboard restarted: queue it again?)" : "") + (j.reason ? `: ${j.reason}` : "")),
    el("td", {}, j.state === "running" ? duration(j.eta_s) : "—"),
    el("td", {}, new Date(j.queued_at * 1000).toLocaleTimeString()),
    el("td", {}, j.started_at ? new Date(j.started_at * 1000).toLocaleTimeString() : "—"),
    el("td", {}, ...(j.state === "running" ? [button("stop", `/api/jobs/${j.id}/stop`)] :
                     j.state === "queued" ? [button("cancel", `/api/jobs/${j.id}/stop`)] :
                     j.state === "held" ? [button("queue", `/api/jobs/${j.id}/queue`), button("cancel", `/api/jobs/${j.id}/stop`)] :
                     ENDED.includes(j.state) && j.state !== "finished" ? [button("continue", `/api/jobs/${j.id}/continue`)] : [])))));
  if (!jobs.length) body.replaceChildren(el("tr", {}, el("td", { colspan: 6 }, "Nothing queued: make a new run below.")));
  const latest = jobs.find((j) => j.state === "running" || j.state === "stopping") || jobs[0];
  $("#job-log").hidden = !latest;
  if (latest) $("#job-log").textContent = `${latest.title} — last lines of its log:\n${latest.tail.join("\n")}`;
}

// ---------------------------------------------------------------- a new run
const form = { folders: [], project: null };
const where = (value) => JSON.parse(value);  // a <select>'s value: {"root": i, "path": "..."}

async function loadFolders() {
  const got = await getJSON("/api/folders");
  const picked = $("#nr-folder").value;
  form.folders = got.folders;
  $("#nr-folder").replaceChildren(el("option", { value: "" }, "— pick a folder —"), ...got.folders.map((f) =>
    el("option", { value: JSON.stringify({ root: f.root, path: f.path }) },
      `${got.roots[f.root]}/${f.path} (${f.items} items${f.dataset_toml ? ", has dataset.toml" : ""})`)));
  $("#nr-folder").value = picked;  // a refresh after a run was made keeps the folder picked
}

async function showFolder() {
  if (!$("#nr-folder").value) return;
  const f = where($("#nr-folder").value);
  if (!$("#nr-name").value) $("#nr-name").value = f.path.split("/").pop().replace(/[^\w.\-]+/g, "_");
  $("#nr-check").textContent = "checking…";
  try {
    const got = await getJSON(`/api/folder?root=${f.root}&path=${encodeURIComponent(f.path)}&force=${$("#nr-force").checked}&task=${encodeURIComponent($("#nr-task").value)}`);
    $("#nr-check").textContent = got.report;
    $("#nr-check").className = `report ${got.errors.length ? "bad" : got.warnings.length ? "warn" : "ok"}`;
    $("#nr-create").disabled = got.errors.length > 0;  // errors block; warnings are shown
    renderCaptions(got.items);
  } catch (e) {
    $("#nr-check").textContent = e.message;
    $("#nr-check").className = "report bad";
  }
}

function renderCaptions(items) {
  $("#nr-captions").replaceChildren(...items.map((it) => {
    const text = el("textarea", { rows: 3, cols: 28 });
    text.value = it.caption ?? "";
    const save = el("button", { onclick: async () => {
      if (await act("/api/caption", { ...it.media, text: text.value })) { save.textContent = "saved"; showFolder(); }
    } }, "save caption");
    text.oninput = () => { save.textContent = "save caption"; };
    const picture = it.preview ? el("img", { src: withToken(`/media?root=${it.preview.root}&path=${encodeURIComponent(it.preview.path)}`), alt: it.media.path })
                               : el("span", {}, it.media.path);
    return el("figure", { class: `caption${it.caption === null ? " missing" : ""}` }, picture,
      el("figcaption", {}, it.media.path.split("/").pop()), text, save);
  }));
}

async function loadModels() {
  const choices = await getJSON(`/api/models?task=${$("#nr-task").value}`);
  $("#nr-models").replaceChildren(...Object.entries(choices).map(([key, files]) => el("label", {}, `${key} `,
    el("select", { "data-model": key }, ...(files.length ? files.map((f) => el("option", { value: JSON.stringify({ root: f.root, path: f.path }) },
      f.path + (f.recipe ? "" : " (not the recipe's name)"))) : [el("option", { value: "" }, "none found under models/: `wanpair download`")])))));
}

function request() {
  const models = {}, train = {};
  for (const s of document.querySelectorAll("#nr-models select")) if (s.value) models[s.dataset.model] = where(s.value);
  for (const s of document.querySelectorAll("[data-setting]")) if (s.value !== "") train[s.dataset.setting] = s.value;
  const experts = {};
  for (const s of document.querySelectorAll("[data-expert-setting]")) {
    if (s.value !== "") (experts[s.dataset.expert] ??= {})[s.dataset.expertSetting] = s.value;
  }
  const folder = where($("#nr-folder").value);
  return { root: folder.root, folder: folder.path, name: $("#nr-name").value,
           task: $("#nr-task").value, models, train, experts, prompts: $("#nr-prompts").value,
           sample_every_n_epochs: $("#nr-sample-every").value, recipe_dataset: $("#nr-force").checked };
}

async function preview() {
  if (!$("#nr-folder").value) return alert("pick a folder first");
  const got = await act("/api/new-run/preview", request());
  if (!got) return;
  $("#nr-files").hidden = false;
  $("#nr-project-name").textContent = `${got.project.path}${got.existing.length ? ` — replaces: ${got.existing.join(", ")}` : ""}`;
  $("#nr-project-toml").textContent = got.project_toml;
  $("#nr-dataset-name").textContent = `${got.dataset.path}${got.dataset_toml === null ? " (kept as it is)" : ""}`;
  $("#nr-dataset-toml").textContent = got.dataset_toml ?? "";
  $("#nr-problems").replaceChildren(...[...got.problems, ...got.notes].map((p) => el("li", {}, p)));
}

async function create() {
  if (!$("#nr-folder").value) return alert("pick a folder first");
  const got = await act("/api/new-run", request());
  if (!got) return;
  form.project = got.project;
  $("#nr-created").hidden = false;
  $("#nr-done").textContent = got.done.join("\n");
  $("#nr-plan").textContent = "asking the doctor…";
  const plan = await post("/api/plan", got.project).catch((e) => ({ ok: false, lines: [e.message] }));
  $("#nr-plan").textContent = plan.lines.join("\n");
  $("#nr-start").disabled = !plan.ok;
  loadFolders();
}

async function start() {
  const overwrite = $("#nr-overwrite").checked;
  if (overwrite && !confirm("Start over: remove this run's earlier states, intermediate LoRAs, metrics and samples?")) return;
  if (await act("/api/jobs", { ...form.project, overwrite })) loadJobs();
}

// captions for the media that have none, by `wanpair caption` (queued: it takes the GPU like a training)
async function captionMissing() {
  if (!$("#nr-folder").value) return alert("pick a folder first");
  if (await act("/api/caption-job", { ...where($("#nr-folder").value), trigger: $("#nr-trigger").value })) loadJobs();
}

function setUpForm() {
  $("#access").textContent = TOKEN ? "" : "open the URL `wanpair dashboard` printed (it ends in ?token=…)";
  $("#nr-folder").onchange = showFolder;
  $("#nr-force").onchange = showFolder;
  $("#nr-task").onchange = () => { loadModels(); showFolder(); };  // an image folder is no dataset for i2v-A14B
  $("#nr-caption").onclick = captionMissing;
  $("#nr-preview").onclick = preview;
  $("#nr-create").onclick = create;
  $("#nr-start").onclick = start;
  loadFolders();
  loadModels();
}

// ---------------------------------------------------------------- start
$("#viewer").onclick = () => { $("#viewer").hidden = true; $("#viewer-body").replaceChildren(); };
window.addEventListener("hashchange", route);
function route() {
  const m = location.hash.match(/run=([0-9a-f]+)/);
  if (m && m[1] !== state.runId) showRun(m[1]);
}
setUpForm();
loadRuns();
loadJobs();
setInterval(loadRuns, 5000);
setInterval(loadJobs, 2000);
route();
