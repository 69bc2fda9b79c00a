// bitplan's page: plain JavaScript over the HTTP API (/v1), nothing to build or download.
// Views: profiles, plan (form + heat map of bits), compare (error against bits per weight), jobs (live progress).
// The bearer token, when the service asks for one, is asked once and kept in sessionStorage (this tab only).
"use strict";

const TOKEN_KEY = "bitplan.token";
const $ = (sel) => document.querySelector(sel);

// ------------------------------------------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

// the service answers {"detail": "one line"} or, for a malformed body, {"detail": [{loc, msg}, ...]}
function detailText(body) {
  const d = body && body.detail !== undefined ? body.detail : body;
  if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
  return typeof d === "string" ? d : JSON.stringify(d);
}

// the response of a request with the token; a refusal becomes an ApiError with the service's one line
async function send(path, { method = "GET", body } = {}) {
  const headers = authHeaders();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401) {
    askToken();
    throw new ApiError(401, "this service needs its bearer token");
  }
  if (!r.ok) throw new ApiError(r.status, detailText(parsed(await r.text())) || `HTTP ${r.status}`);
  return r;
}

// a non-JSON answer is shown as it came
function parsed(text) {
  try { return JSON.parse(text); } catch (_) { return text; }
}

async function api(path, options) {
  return parsed(await (await send(path, options)).text());
}

// every item of a paged list (limit/cursor), up to `max`
async function allPages(path, max = 5000) {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=500${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

function showError(e) {
  const box = $("#error");
  if (!e) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = e instanceof ApiError ? `${e.status}: ${e.message}` : String(e.message || e);
  box.hidden = false;
}

// runs `fn`, shows its error in the banner; a fresh success clears the banner
async function guarded(fn) {
  try { const out = await fn(); showError(null); return out; } catch (e) { showError(e); return undefined; }
}

// ----------------------------------------------------------------------------------------------- token

function askToken() {
  const dialog = $("#token-dialog");
  if (!dialog.open) dialog.showModal();
}

function showTokenState() {
  const has = !!sessionStorage.getItem(TOKEN_KEY);
  const el = $("#token-state");
  el.textContent = has ? "token kept for this tab · " : "";
  if (has) {
    const forget = document.createElement("a");
    forget.href = "#";
    forget.textContent = "forget it";
    forget.addEventListener("click", (ev) => { ev.preventDefault(); sessionStorage.removeItem(TOKEN_KEY); showTokenState(); });
    el.append(forget);
  }
}

$("#token-form").addEventListener("submit", () => {
  sessionStorage.setItem(TOKEN_KEY, $("#token-input").value.trim());
  $("#token-input").value = "";
  showTokenState();
  route();
});

// --------------------------------------------------------------------------------------------- helpers

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

const fmt = {
  num: (x, d = 3) => (x == null ? "" : Number(x).toFixed(d)),
  sci: (x) => (x == null ? "" : Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? Number(x).toPrecision(4) : Number(x).toExponential(3)),
  when: (s) => (s ? new Date(s).toLocaleString() : ""),
};

const state = { profiles: [], profilesCursor: null, documents: new Map(), plan: null, following: new Map(), server: null };

async function serverInfo() {
  if (!state.server) state.server = await api("/v1/server");
  return state.server;
}

async function profileDocument(id) {
  if (!state.documents.has(id)) state.documents.set(id, await api(`/v1/profiles/${encodeURIComponent(id)}`));
  return state.documents.get(id);
}

// -------------------------------------------------------------------------------------------- profiles

async function loadProfiles(more = false) {
  const cursor = more ? state.profilesCursor : null;
  const page = await api(`/v1/profiles?limit=50${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
  state.profiles = more ? state.profiles.concat(page.items) : page.items;
  state.profilesCursor = page.next_cursor;
  const body = $("#profiles-table tbody");
  body.replaceChildren(...state.profiles.map((p) => el("tr", { dataset: { id: p.id } },
    el("td", { class: "id" }, p.id),
    el("td", {}, p.model.name),
    el("td", {}, p.estimator),
    el("td", {}, p.quantizer.method),
    el("td", {}, p.calibration.name ? `${p.calibration.name} (${p.calibration.n_tokens} tokens)` : ""),
    el("td", { class: "num" }, p.n_modules),
    el("td", {}, p.options.map(optionLabel).join(" ")),
    el("td", {}, p.device),
    el("td", {}, p.has_latency ? "yes" : ""),
    el("td", { class: "validation", dataset: { id: p.id } }),
    el("td", {}, fmt.when(p.created_at)),
    el("td", {}, el("button", { type: "button", onclick: () => { location.hash = `#plan/${p.id}`; } }, "plan…")))));
  $("#profiles-more").hidden = !state.profilesCursor;
  guarded(() => showValidation(state.profiles.map((p) => p.id)));
  for (const select of [$("#plan-profile"), $("#compare-profile")]) {
    const keep = select.value;
    select.replaceChildren(...state.profiles.map((p) => el("option", { value: p.id }, `${p.id} · ${p.model.name} · ${p.estimator}`)));
    if (keep && state.profiles.some((p) => p.id === keep)) select.value = keep;
  }
}

// "rho 0.93 · 8 plans · shakespeare:eval": the text with the most evaluated plans; blank until 3 are evaluated
async function showValidation(ids) {
  for (const id of ids) {
    const v = await api(`/v1/profiles/${encodeURIComponent(id)}/validation`);
    const cell = document.querySelector(`#profiles-table td.validation[data-id="${CSS.escape(id)}"]`);
    const t = v.texts.find((x) => x.spearman_kl != null || x.spearman_perplexity != null);
    if (!cell || !t) continue;
    const [what, rho] = t.spearman_kl != null ? ["KL", t.spearman_kl] : ["perplexity", t.spearman_perplexity];
    cell.textContent = `ρ ${fmt.num(rho, 2)} (${what}, ${t.n_plans} plans, ${t.corpus})`;
  }
}

function optionLabel(o) {
  if (o.gguf) return o.gguf;
  return `${o.bits}b${o.group_size ? `/g${o.group_size}` : ""}`;
}

$("#profiles-more").addEventListener("click", () => guarded(() => loadProfiles(true)));

// ------------------------------------------------------------------------------------------------ plan

// the budget's bounds from the profile's exact sizes: every module at its smallest / largest option
async function budgetBounds(id) {
  const doc = await profileDocument(id);
  let lo = 0, hi = 0, n = 0;
  for (const m of doc.modules) {
    lo += Math.min(...m.size_bits);
    hi += Math.max(...m.size_bits);
    n += m.shape[0] * m.shape[1];
  }
  const mib = (bits) => (bits + doc.fixed_bits) / 8 / 2 ** 20;
  return { bpw: [lo / n, hi / n], MiB: [mib(lo), mib(hi)] };
}

function budgetUnit() { return document.querySelector('input[name="unit"]:checked').value; }

async function setBudgetRange() {
  const id = $("#plan-profile").value;
  if (!id) return;
  const bounds = await budgetBounds(id);
  const unit = budgetUnit();
  const [lo, hi] = bounds[unit];
  const slider = $("#budget-slider"), value = $("#budget-value");
  const digits = unit === "bpw" ? 2 : 1;
  slider.min = lo; slider.max = hi; slider.step = unit === "bpw" ? 0.01 : 0.1;
  const mid = unit === "bpw" ? Math.min(Math.max(3.5, lo), hi) : lo + (hi - lo) * 0.4;
  slider.value = mid;
  value.value = Number(mid).toFixed(digits);
  $("#budget-unit").textContent = unit;
  $("#budget-range").textContent = `${lo.toFixed(digits)} to ${hi.toFixed(digits)} ${unit}`;
}

$("#budget-slider").addEventListener("input", () => {
  $("#budget-value").value = Number($("#budget-slider").value).toFixed(budgetUnit() === "bpw" ? 2 : 1);
});
$("#budget-value").addEventListener("input", () => { $("#budget-slider").value = $("#budget-value").value; });
for (const radio of document.querySelectorAll('input[name="unit"]')) radio.addEventListener("change", () => guarded(setBudgetRange));
$("#plan-profile").addEventListener("change", () => guarded(async () => { await setBudgetRange(); await loadPlans(); }));

$("#plan-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const form = new FormData(ev.target);
  const body = {
    profile_id: form.get("profile_id"),
    budget: `${form.get("budget_value")}${budgetUnit()}`,
    allocator: form.get("allocator"),
    granularity: form.get("granularity"),
    pins: String(form.get("pins") || "").split(/[,\n]/).map((s) => s.trim()).filter(Boolean),
  };
  if (form.get("engine")) body.engine = form.get("engine");
  const button = $("#plan-submit");
  button.disabled = true;
  guarded(async () => {
    const plan = await api("/v1/plans", { method: "POST", body });
    await showPlan(plan);
    await loadPlans();
  }).finally(() => { button.disabled = false; });
});

async function loadPlans() {
  const id = $("#plan-profile").value;
  if (!id) return;
  const page = await api(`/v1/plans?profile_id=${encodeURIComponent(id)}&limit=20`);
  $("#plans-table tbody").replaceChildren(...page.items.map((p) => el("tr", { dataset: { id: p.id } },
    el("td", { class: "id" }, p.id), el("td", {}, p.allocator), el("td", {}, p.budget),
    el("td", { class: "num" }, fmt.num(p.bits_per_weight)), el("td", { class: "num" }, fmt.num(p.size_mib, 2)),
    el("td", { class: "num" }, fmt.sci(p.predicted_error)), el("td", {}, p.status),
    el("td", {}, el("button", { type: "button", onclick: () => guarded(async () => showPlan(await api(`/v1/plans/${p.id}`))) }, "show")))));
}

async function showPlan(plan) {
  state.plan = plan;
  const doc = await profileDocument(plan.profile_id);
  $("#plan-result").hidden = false;
  $("#plan-title").textContent = `${plan.id} · ${plan.allocator} · ${plan.budget}`;
  const rows = [
    ["bits per weight", fmt.num(plan.bits_per_weight, 4)],
    ["size", `${fmt.num(plan.size_mib, 2)} MiB`],
    ["predicted error", fmt.sci(plan.predicted_error)],
    ["status", plan.status],
    ["solved in", `${fmt.num(plan.solve_seconds, 3)} s`],
    ["pins", (plan.pins || []).join(", ") || "none"],
  ];
  $("#plan-summary").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { dataset: { key: k } }, v)]));
  const link = $("#plan-download");
  if (link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([JSON.stringify(plan, null, 2)], { type: "application/json" }));
  link.download = `${plan.id}.json`;
  drawHeatmap($("#heatmap"), plan, doc);
}

$("#plan-apply").addEventListener("click", () => {
  if (!state.plan) return;
  location.hash = "#jobs";
  $("#job-kind").value = "apply";
  showJobFields();
  $('#job-form [name="plan"]').value = state.plan.id;
  $('#job-form [name="out"]').value = exportPath(state.plan.id, $('#job-form [name="format"]').value);
});

// where an export goes by default: a folder (a file for gguf) under exports/ of the server's first root
function exportPath(planId, format) {
  return `exports/${planId}-${format}${format === "gguf" ? ".gguf" : ""}`;
}

$('#job-form [name="format"]').addEventListener("change", (ev) => {
  const out = $('#job-form [name="out"]');
  const plan = $('#job-form [name="plan"]').value.trim();
  if (plan && (!out.value || out.value.startsWith("exports/"))) out.value = exportPath(plan, ev.target.value);
});

// ---------------------------------------------------------------------------------------------- heat map

// bits -> colour: red where a module is squeezed hardest, through yellow, to green at 8 bits and blue at 16
const PALETTE = [[2, [215, 48, 39]], [3, [252, 141, 89]], [4, [254, 224, 139]], [5, [217, 239, 139]],
  [6, [145, 207, 96]], [8, [26, 152, 80]], [16, [44, 123, 182]]];

function bitsColor(bits) {
  if (bits <= PALETTE[0][0]) return PALETTE[0][1];
  for (let i = 1; i < PALETTE.length; i++) {
    const [b1, c1] = PALETTE[i];
    if (bits <= b1) {
      const [b0, c0] = PALETTE[i - 1];
      const t = (bits - b0) / (b1 - b0);
      return c0.map((c, k) => Math.round(c + t * (c1[k] - c)));
    }
  }
  return PALETTE[PALETTE.length - 1][1];
}

const css = (rgb) => `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;

// size-weighted mean bits of the matrices in `ms` ([{bits, numel}]): what a cell holding several shows
function meanBits(ms) {
  const n = ms.reduce((s, m) => s + m.numel, 0);
  return ms.reduce((s, m) => s + m.bits * m.numel, 0) / n;
}

// the plan's bits arranged as the heat map draws them: layer x role for the dense modules, layer x expert
// for routed experts (with each expert's share of its layer's routed tokens, where the profile has it),
// and the modules outside any layer (embedding, head) on a row of their own
function heatmapData(plan, doc) {
  const dense = new Map(), experts = new Map(), other = [];
  const roles = [], layers = new Set(), expertIds = new Set(), expertLayers = new Set();
  for (const m of doc.modules) {
    const option = plan.assignment[m.name];
    if (!option) continue;
    const item = { name: m.name, bits: option.bits, numel: m.shape[0] * m.shape[1], tokens: m.tokens_routed };
    if (m.layer == null) { other.push({ ...item, label: m.name }); continue; }
    if (m.expert != null) {
      const key = `${m.layer}/${m.expert}`;
      if (!experts.has(key)) experts.set(key, []);
      experts.get(key).push(item);
      expertIds.add(m.expert); expertLayers.add(m.layer);
      continue;
    }
    if (!roles.includes(m.role)) roles.push(m.role);
    layers.add(m.layer);
    const key = `${m.layer}/${m.role}`;
    if (!dense.has(key)) dense.set(key, []);
    dense.get(key).push(item);
  }
  const shares = new Map();
  for (const layer of expertLayers) {
    const tokens = [...expertIds].map((e) => {
      const ms = experts.get(`${layer}/${e}`) || [];
      return [e, ms.length && ms[0].tokens != null ? ms[0].tokens : null];
    });
    const total = tokens.reduce((s, [, t]) => s + (t || 0), 0);
    for (const [e, t] of tokens) if (t != null && total > 0) shares.set(`${layer}/${e}`, t / total);
  }
  return { dense, experts, other, roles, shares, layers: [...layers].sort((a, b) => a - b),
    expertIds: [...expertIds].sort((a, b) => a - b), expertLayers: [...expertLayers].sort((a, b) => a - b) };
}

function drawHeatmap(canvas, plan, doc) {
  const d = heatmapData(plan, doc);
  const cells = [];
  const ctx0 = canvas.getContext("2d");
  ctx0.font = "12px system-ui, sans-serif";
  const labelW = 14 + Math.max(60, ...d.roles.map((r) => ctx0.measureText(r).width), ...d.expertLayers.map((l) => ctx0.measureText(`layer ${l}`).width));
  const cell = Math.max(14, Math.min(30, Math.floor(1100 / Math.max(1, d.layers.length, d.expertIds.length))));
  const shareH = d.shares.size ? 6 : 0;
  const rowsH = (d.roles.length ? 40 + d.roles.length * cell : 0)
    + (d.expertIds.length ? 48 + d.expertLayers.length * (cell + shareH + 2) : 0)
    + (d.other.length ? 40 + cell : 0) + 60;
  // wide enough for the grids and for the titles above them
  const width = Math.max(680, labelW + Math.max(d.layers.length, d.expertIds.length, d.other.length * 4) * cell + 20);
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.ceil(width * ratio); canvas.height = Math.ceil(rowsH * ratio);
  canvas.style.width = `${width}px`; canvas.style.height = `${rowsH}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, rowsH);
  ctx.font = "12px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  let y = 6;

  const title = (text) => { ctx.fillStyle = "#1d2430"; ctx.textAlign = "left"; ctx.fillText(text, 0, y + 8); y += 22; };
  const fillCell = (x, yy, w, h, bits, info) => {
    ctx.fillStyle = css(bitsColor(bits));
    ctx.fillRect(x, yy, w - 1, h - 1);
    if (w >= 18) {
      ctx.fillStyle = bits <= 3 || bits >= 12 ? "#fff" : "#1d2430";
      ctx.textAlign = "center";
      ctx.fillText(Number.isInteger(bits) ? String(bits) : bits.toFixed(1), x + (w - 1) / 2, yy + (h - 1) / 2 + 1);
    }
    cells.push({ x, y: yy, w: w - 1, h: h - 1, bits, ...info });
  };
  const columnTicks = (values, prefix) => {
    ctx.fillStyle = "#667085"; ctx.textAlign = "center";
    const every = Math.ceil(16 / cell);
    values.forEach((v, i) => { if (i % every === 0) ctx.fillText(`${prefix}${v}`, labelW + i * cell + cell / 2, y + 6); });
    y += 16;
  };

  if (d.roles.length) {
    title("bits per module: decoder layer × role");
    columnTicks(d.layers, "");
    for (const role of d.roles) {
      ctx.fillStyle = "#1d2430"; ctx.textAlign = "right"; ctx.fillText(role, labelW - 8, y + cell / 2);
      d.layers.forEach((layer, i) => {
        const ms = d.dense.get(`${layer}/${role}`);
        if (ms) fillCell(labelW + i * cell, y, cell, cell, meanBits(ms), { kind: "dense", layer, role, names: ms.map((m) => m.name) });
      });
      y += cell;
    }
    y += 14;
  }
  if (d.expertIds.length) {
    title(`bits per routed expert: layer × expert${d.shares.size ? " (bar: its share of the layer's routed tokens)" : ""}`);
    columnTicks(d.expertIds, "e");
    for (const layer of d.expertLayers) {
      ctx.fillStyle = "#1d2430"; ctx.textAlign = "right"; ctx.fillText(`layer ${layer}`, labelW - 8, y + cell / 2);
      const maxShare = Math.max(...d.expertIds.map((e) => d.shares.get(`${layer}/${e}`) || 0));
      d.expertIds.forEach((e, i) => {
        const ms = d.experts.get(`${layer}/${e}`);
        if (!ms) return;
        const share = d.shares.get(`${layer}/${e}`);
        const x = labelW + i * cell;
        fillCell(x, y, cell, cell, meanBits(ms), { kind: "expert", layer, expert: e, share, names: ms.map((m) => m.name) });
        if (share != null && maxShare > 0) {
          ctx.fillStyle = "#2c5fb3";
          ctx.fillRect(x, y + cell, Math.max(1, (cell - 1) * share / maxShare), shareH - 1);
        }
      });
      y += cell + shareH + 2;
    }
    y += 14;
  }
  if (d.other.length) {
    title("outside the decoder layers");
    const w = cell * 4;
    d.other.forEach((m, i) => {
      fillCell(labelW + i * w, y, w, cell, m.bits, { kind: "other", label: m.label, names: [m.name] });
      ctx.fillStyle = "#667085"; ctx.textAlign = "left";
      ctx.fillText(m.label.length > 14 ? `${m.label.slice(0, 13)}…` : m.label, labelW + i * w, y + cell + 8);
    });
    y += cell + 24;
  }
  // legend: one swatch per width the profile offers
  const widths = [...new Set(doc.options.map((o) => o.bits))].sort((a, b) => a - b);
  ctx.textAlign = "left"; ctx.fillStyle = "#667085"; ctx.fillText("bits", 0, y + 8);
  widths.forEach((b, i) => {
    const x = labelW + i * 46;
    ctx.fillStyle = css(bitsColor(b)); ctx.fillRect(x, y, 18, 16);
    ctx.fillStyle = "#1d2430"; ctx.fillText(String(b), x + 22, y + 8);
  });
  // what tests and the tooltip read: every cell where it was drawn, with what it shows
  window.bitplanHeatmap = { planId: plan.id, cells, ratio };
  canvas.dataset.plan = plan.id;
  canvas.dataset.cells = String(cells.length);
}

function heatmapTip(ev) {
  const tip = $("#heatmap-tip");
  const data = window.bitplanHeatmap;
  const rect = ev.target.getBoundingClientRect();
  const x = ev.clientX - rect.left, y = ev.clientY - rect.top;
  const c = data && data.cells.find((k) => x >= k.x && x < k.x + k.w && y >= k.y && y < k.y + k.h);
  if (!c) { tip.hidden = true; return; }
  const where = c.kind === "dense" ? `layer ${c.layer} · ${c.role}`
    : c.kind === "expert" ? `layer ${c.layer} · expert ${c.expert}${c.share != null ? ` · ${(100 * c.share).toFixed(1)} % of routed tokens` : ""}`
      : c.label;
  tip.textContent = `${where}: ${Number.isInteger(c.bits) ? c.bits : c.bits.toFixed(2)} bits`;
  tip.style.left = `${x + 14}px`; tip.style.top = `${y + 10}px`;
  tip.hidden = false;
}

$("#heatmap").addEventListener("mousemove", heatmapTip);
$("#heatmap").addEventListener("mouseleave", () => { $("#heatmap-tip").hidden = true; });

// --------------------------------------------------------------------------------------------- compare

// one colour per allocator, the same in both charts
const ALLOCATOR_COLORS = { ilp: "#1a9850", greedy: "#2c5fb3", closed_form: "#ff7f00", uniform: "#d73027",
  dp: "#984ea3", evolutionary: "#a65628" };
const LINE_COLORS = ["#666666", "#17becf", "#bcbd22", "#e377c2"];
const lineColor = (name, i) => ALLOCATOR_COLORS[name] || LINE_COLORS[i % LINE_COLORS.length];

// series: [{name, points: [[x, y], ...]}]; a log scale where the values span more than two decades
function lineChart(canvas, series, { xLabel, yLabel }) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, left = 70, right = 150, top = 12, bottom = 40;
  ctx.clearRect(0, 0, W, H);
  ctx.font = "12px system-ui, sans-serif";
  const pts = series.flatMap((s) => s.points).filter(([, yv]) => Number.isFinite(yv));
  if (!pts.length) return { series, log: false };
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const positive = ys.every((v) => v > 0);
  const log = positive && Math.max(...ys) / Math.min(...ys) > 100;
  const fy = log ? Math.log10 : (v) => v;
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys.map(fy)), Math.max(...ys.map(fy))];
  if (x0 === x1) { x0 -= 0.5; x1 += 0.5; }
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const px = (x) => left + (x - x0) / (x1 - x0) * (W - left - right);
  const py = (yv) => top + (1 - (fy(yv) - y0) / (y1 - y0)) * (H - top - bottom);
  ctx.strokeStyle = "#d8dde6"; ctx.fillStyle = "#667085"; ctx.lineWidth = 1;
  ctx.strokeRect(left, top, W - left - right, H - top - bottom);
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let i = 0; i <= 5; i++) {
    const x = x0 + (x1 - x0) * i / 5;
    ctx.fillText(x.toFixed(2), px(x), H - bottom + 4);
  }
  ctx.fillText(xLabel, left + (W - left - right) / 2, H - 16);
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4;
    const shown = log ? 10 ** v : v;
    ctx.fillText(fmt.sci(shown), left - 6, py(shown));
  }
  ctx.save(); ctx.translate(12, top + (H - top - bottom) / 2); ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "center"; ctx.fillText(`${yLabel}${log ? " (log)" : ""}`, 0, 0); ctx.restore();
  series.forEach((s, i) => {
    const color = lineColor(s.name, i);
    const points = s.points.filter(([, yv]) => Number.isFinite(yv)).sort((a, b) => a[0] - b[0]);
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach(([x, yv], k) => (k ? ctx.lineTo(px(x), py(yv)) : ctx.moveTo(px(x), py(yv))));
    ctx.stroke();
    for (const [x, yv] of points) { ctx.beginPath(); ctx.arc(px(x), py(yv), 3, 0, 2 * Math.PI); ctx.fill(); }
    ctx.textAlign = "left";
    ctx.fillRect(W - right + 14, top + 8 + i * 18, 14, 3);
    ctx.fillStyle = "#1d2430"; ctx.fillText(`${s.name} (${points.length})`, W - right + 34, top + 10 + i * 18);
  });
  return { series, log };
}

// loads of the comparison started so far: one for the page's first profile may still wait on the API when
// the user picks another, and must not draw over the newer one when it returns
let compareLoads = 0;

async function loadCompare() {
  const load = ++compareLoads;
  const id = $("#compare-profile").value;
  if (!id) return;
  const plans = await allPages(`/v1/plans?profile_id=${encodeURIComponent(id)}`);
  const byId = new Map(plans.map((p) => [p.id, p]));
  const evaluations = (await allPages("/v1/evaluations")).filter((e) => byId.has(e.plan_id));
  if (load !== compareLoads) return;
  const groups = (rows, value) => {
    const out = new Map();
    for (const r of rows) {
      const p = byId.get(r.plan_id || r.id);
      if (!out.has(p.allocator)) out.set(p.allocator, []);
      out.get(p.allocator).push([p.bits_per_weight, value(r)]);
    }
    return [...out].sort((a, b) => a[0].localeCompare(b[0])).map(([name, points]) => ({ name, points }));
  };
  const predicted = groups(plans, (p) => p.predicted_error);
  const measured = groups(evaluations, (e) => e.perplexity);
  window.bitplanCharts = {
    predicted: lineChart($("#chart-predicted"), predicted, { xLabel: "bits per weight", yLabel: "predicted error" }),
    measured: lineChart($("#chart-measured"), measured, { xLabel: "bits per weight", yLabel: "perplexity" }),
  };
  $("#compare-note").textContent = `${plans.length} plans, ${evaluations.length} evaluated`
    + (evaluations.length ? "" : ": evaluate plans to see measured error here");
}

$("#compare-profile").addEventListener("change", () => guarded(loadCompare));

// ------------------------------------------------------------------------------------------------ jobs

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

function showJobFields() {
  const kind = $("#job-kind").value;
  for (const label of document.querySelectorAll("#job-form [data-kind]")) {
    const on = label.dataset.kind === kind;
    label.hidden = !on;
    for (const input of label.querySelectorAll("input, select")) input.disabled = !on;
  }
}

$("#job-kind").addEventListener("change", showJobFields);

$("#job-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const form = ev.target;
  const kind = $("#job-kind").value;
  const params = {};
  for (const input of form.querySelectorAll(`[data-kind="${kind}"] input, [data-kind="${kind}"] select`)) {
    const name = input.name === "eval_tokens" ? "tokens" : input.name;
    if (input.type === "checkbox") { if (input.checked) params[name] = true; continue; }
    const v = input.value.trim();
    if (v === "") continue;
    params[name] = input.type === "number" ? Number(v) : v;
  }
  guarded(async () => {
    const job = await api("/v1/jobs", { method: "POST", body: { kind, params } });
    await loadJobs();
    follow(job.id);
  });
});

function jobRow(job) {
  const bar = el("progress", { max: 1, value: job.progress });
  return el("tr", { dataset: { id: job.id, state: job.state } },
    el("td", { class: "id" }, job.id),
    el("td", {}, job.kind),
    el("td", { class: `state state-${job.state}` }, job.state),
    el("td", {}, bar, ` ${Math.round(100 * job.progress)} %`),
    el("td", { class: "message" }, job.error || job.message || ""),
    el("td", { class: "id" }, job.result_id || ""),
    el("td", {}, fmt.when(job.created_at)),
    el("td", {}, FINAL.has(job.state) ? downloadButton(job) : el("button", { type: "button", onclick: () => guarded(async () => {
      updateJob(await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" }));
    }) }, "cancel")));
}

function downloadButton(job) {
  if (job.kind !== "apply" || job.state !== "succeeded") return "";
  return el("button", { type: "button", class: "download", onclick: () => guarded(() => downloadOutput(job.id)) }, "download");
}

// the checkpoint through fetch (a plain link cannot send the bearer token), saved under the server's name
async function downloadOutput(id) {
  const r = await send(`/v1/jobs/${encodeURIComponent(id)}/output`);
  const name = /filename="?([^";]+)"?/.exec(r.headers.get("Content-Disposition") || "");
  const link = el("a", { href: URL.createObjectURL(await r.blob()), download: name ? name[1] : `${id}.out` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

function updateJob(job) {
  const old = document.querySelector(`#jobs-table tr[data-id="${job.id}"]`);
  const row = jobRow(job);
  if (old) old.replaceWith(row); else $("#jobs-table tbody").prepend(row);
}

async function loadJobs() {
  const page = await api("/v1/jobs?limit=50");
  $("#jobs-table tbody").replaceChildren(...page.items.map(jobRow));
  // live progress for the newest unfinished jobs; a browser keeps 6 connections per server, so few streams
  for (const job of page.items.filter((j) => !FINAL.has(j.state)).slice(0, 3)) follow(job.id);
}

// the job's server-sent events, read through fetch (EventSource cannot send the bearer token)
async function follow(id) {
  if (state.following.has(id)) return;
  const stop = new AbortController();
  state.following.set(id, stop);
  try {
    const r = await fetch(`/v1/jobs/${encodeURIComponent(id)}/events`, { headers: authHeaders(), signal: stop.signal });
    if (!r.ok) return;
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (data) updateJob(JSON.parse(data));
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e);
  } finally {
    state.following.delete(id);
  }
}

function stopFollowing() {
  for (const stop of state.following.values()) stop.abort();
  state.following.clear();
}

$("#jobs-refresh").addEventListener("click", () => guarded(loadJobs));

// ---------------------------------------------------------------------------------------------- routing

// #profiles, #plan, #plan/PROFILE_ID, #compare, #jobs
async function route() {
  const [view, arg] = (location.hash.slice(1) || "profiles").split("/");
  const name = ["profiles", "plan", "compare", "jobs"].includes(view) ? view : "profiles";
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${name}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === name);
  if (name !== "jobs") stopFollowing();
  await guarded(async () => {
    if (!state.profiles.length || name === "profiles") await loadProfiles();
    if (name === "plan") {
      if (arg) $("#plan-profile").value = decodeURIComponent(arg);
      await setBudgetRange();
      await loadPlans();
    } else if (name === "compare") {
      await loadCompare();
    } else if (name === "jobs") {
      showJobFields();
      const info = await serverInfo();
      $("#server-roots").textContent = info.roots.join(", ");
      await loadJobs();
    }
  });
  document.body.dataset.view = name;
  document.body.dataset.ready = "1";
}

window.addEventListener("hashchange", route);
showTokenState();
showJobFields();
route();
