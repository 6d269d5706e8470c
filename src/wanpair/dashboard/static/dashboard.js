// wanpair dashboard: the runs list, and one run's two experts side by side (a Wan 2.1 run: its one model), growing live.
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

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
  return r.json();
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
  const src = `/files/${state.runId}/${s.file}`;
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
    return el("tr", { class: l.partial ? "partial" : "" }, el("td", {}, l.expert ? radio : ""), el("td", {}, l.file),
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

// ---------------------------------------------------------------- start
$("#viewer").onclick = () => { $("#viewer").hidden = true; $("#viewer-body").replaceChildren(); };
window.addEventListener("hashchange", route);
function route() {
  const m = location.hash.match(/run=([0-9a-f]+)/);
  if (m && m[1] !== state.runId) showRun(m[1]);
}
loadRuns();
setInterval(loadRuns, 5000);
route();
