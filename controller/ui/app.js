// leaktap dashboard: per-tenant egress against the detector's baseline, the alerts
// with their evidence, and the kernel's loss counters. Plain DOM (textContent only:
// alert text comes from the network) and uPlot. The browser's session cookie
// authenticates every request (see controller/api/sessions.py).
"use strict";

const REFRESH_MS = 30000;
const BYTE_STEPS = [0, 1, 2, 3, 4].flatMap((k) => [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
  .map((m) => m * 1024 ** k));
const MAX_CHARTS = 12;
const $ = (id) => document.getElementById(id);
const state = { role: null, charts: new Map(), timer: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : String(Number(n.toFixed(1)))) + " " + units[i];
}

function when(ts) {
  const d = new Date(ts * 1000);
  const today = d.toDateString() === new Date().toDateString();
  return today ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
               : d.toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, ...options });
  if (response.status === 401) {
    location.reload(); // the session ended: the server answers / with the sign-in form
    throw new Error("signed out");
  }
  if (!response.ok && response.status !== 503) {
    const body = await response.json().catch(() => ({}));
    throw new Error(`${path}: ${response.status} ${body.detail || response.statusText}`);
  }
  return { status: response.status, body: response.status === 204 ? null : await response.json() };
}

function problem(message) {
  $("problem").textContent = message || "";
  $("problem").hidden = !message;
}

// -- alerts -------------------------------------------------------------------

function evidenceList(alert) {
  const list = el("dl", { class: "evidence" });
  for (const [k, v] of Object.entries(alert.evidence)) {
    list.append(el("dt", {}, k), el("dd", {}, typeof v === "object" ? JSON.stringify(v) : String(v)));
  }
  const first = `${when(alert.first_seen)} – ${when(alert.last_seen)}`;
  list.append(el("dt", {}, "activity"), el("dd", {}, first));
  list.append(el("dt", {}, "dedup_key"), el("dd", { class: "mono" }, alert.dedup_key));
  return list;
}

function deliveryList(alert) {
  if (!alert.deliveries.length) return el("p", { class: "empty" }, "No sink routes this alert.");
  const rows = alert.deliveries.map((d) => el("tr", {},
    el("td", {}, d.sink), el("td", {}, d.action),
    el("td", { class: `delivery ${d.state}` }, d.state), el("td", { class: "num" }, String(d.attempts)),
    el("td", {}, d.last_error || "")));
  return el("table", { class: "deliveries" },
    el("thead", {}, el("tr", {}, ...["Sink", "Action", "State", "Attempts", "Last error"]
      .map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows));
}

async function act(alert, action, button) {
  button.disabled = true;
  try {
    await api(`/v1/alerts/${alert.id}/${action}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
    await refresh();
  } catch (e) {
    problem(`${action} failed: ${e.message}`);
    button.disabled = false;
  }
}

function alertRows(alert) {
  const actions = el("td", { class: "actions" });
  if (state.role === "admin") {
    if (alert.status === "open") {
      actions.append(el("button", { type: "button", class: "ack",
        onclick: (e) => { e.stopPropagation(); act(alert, "ack", e.target); } }, "Ack"));
    }
    actions.append(el("button", { type: "button", class: "resolve",
      onclick: (e) => { e.stopPropagation(); act(alert, "resolve", e.target); } }, "Resolve"));
  }
  const destination = alert.destination || (alert.crm_vendor ? `${alert.crm_vendor}:${alert.crm_instance}` : "all CRMs");
  const row = el("tr", { class: `alert ${alert.status}`, "data-alert-id": String(alert.id),
                         tabindex: "0", "aria-expanded": "false" },
    el("td", {}, el("span", { class: `sev ${alert.severity}` }, alert.severity)),
    el("td", { class: "kind" }, alert.kind), el("td", { class: "tenant" }, alert.tenant),
    el("td", {}, destination), el("td", { class: "summary" }, alert.summary),
    el("td", {}, when(alert.last_seen)), el("td", { class: "num" }, String(alert.count)),
    el("td", {}, alert.status), actions);
  const detail = el("tr", { class: "detail", hidden: "" },
    el("td", { colspan: "9" }, el("div", { class: "columns" },
      el("div", {}, el("h4", {}, "Evidence"), evidenceList(alert)),
      el("div", {}, el("h4", {}, "Deliveries"), deliveryList(alert)))));
  const toggle = () => {
    detail.hidden = !detail.hidden;
    row.setAttribute("aria-expanded", String(!detail.hidden));
    state.expanded = detail.hidden ? null : alert.id;
  };
  row.addEventListener("click", toggle);
  row.addEventListener("keydown", (e) => { if (e.key === "Enter") toggle(); });
  if (state.expanded === alert.id) { detail.hidden = false; row.setAttribute("aria-expanded", "true"); }
  return [row, detail];
}

function renderAlerts(alerts) {
  const shown = alerts.filter((a) => a.status === "open" || $("show-acked").checked);
  $("alerts").tBodies[0].replaceChildren(...shown.flatMap(alertRows));
  const open = alerts.filter((a) => a.status === "open").length;
  $("alert-count").textContent = `${open} open`;
  $("no-alerts").hidden = shown.length > 0;
}

// -- volume charts ------------------------------------------------------------

function seriesData(volume, since, until) {
  // the store keeps minutes with traffic only: an idle minute is zero bytes
  const byTs = new Map(volume.series.map((p) => [p.ts, p]));
  const cols = [[], [], [], [], [], []];
  for (let ts = Math.floor(since / 60) * 60; ts < until; ts += 60) {
    const p = byTs.get(ts);
    const b = p && p.baseline;
    cols[0].push(ts);
    cols[1].push(p ? p.crm_bytes_out : 0);
    cols[2].push(p ? p.bytes_out : 0);
    cols[3].push(b ? b.expected : null);
    cols[4].push(b ? b.low : null);
    cols[5].push(b ? b.high : null);
  }
  return cols;
}

function drawAlerts(u, alerts) {
  // shade each alert's span of activity (at least 3 px, so that one minute shows) and
  // name its kind, on the first label row where it does not overlap another
  const { ctx } = u;
  const { left, top, width, height } = u.bbox;
  const px = devicePixelRatio;
  const rowEnds = [];
  ctx.save();
  ctx.font = `${11 * px}px system-ui, sans-serif`;
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  for (const a of [...alerts].sort((p, q) => p.first_seen - q.first_seen)) {
    const x0 = Math.max(u.valToPos(a.first_seen, "x", true), left);
    const x1 = Math.min(Math.max(u.valToPos(a.last_seen + 60, "x", true), x0 + 3 * px), left + width);
    if (x1 <= left || x0 >= left + width) continue;
    const open = a.status === "open";
    ctx.fillStyle = open ? "rgba(220, 38, 38, 0.14)" : "rgba(217, 119, 6, 0.12)";
    ctx.fillRect(x0, top, x1 - x0, height);
    const label = a.kind.replace(/_/g, " ");
    const w = ctx.measureText(label).width + 6 * px;
    const lx = Math.min(x0 + 3 * px, left + width - w); // keep it inside the plot
    let row = rowEnds.findIndex((end) => end <= lx);
    if (row < 0) { row = rowEnds.length; rowEnds.push(0); }
    rowEnds[row] = lx + w;
    ctx.fillStyle = open ? "#b91c1c" : "#b45309";
    ctx.fillText(label, lx, top + (3 + 14 * row) * px);
  }
  ctx.restore();
}

function drawOpenMinute(u, ts) {
  // the open minute (`partial` in the API) is still counting: shade the segment that
  // leads to it, so that a low last point does not read as a drop
  if (ts === null || ts === undefined) return;
  const { left, top, width, height } = u.bbox;
  const x0 = Math.max(u.valToPos(ts - 60, "x", true), left);
  const x1 = Math.min(u.valToPos(ts, "x", true), left + width);
  if (x1 <= x0) return;
  u.ctx.save();
  u.ctx.fillStyle = "rgba(100, 116, 139, 0.14)";
  u.ctx.fillRect(x0, top, x1 - x0, height);
  u.ctx.restore();
}

function chartOptions(width, holder) {
  const value = (u, v) => (v === null ? "–" : bytes(v));
  return {
    width, height: 220,
    cursor: { sync: { key: "lt" } },
    scales: { y: { range: (u, min, max) => [0, Math.max(max, 1024) * 1.1] } },
    // binary steps (256 KiB, 512 KiB, 1 MiB ...) so that the labels read round
    // x: at least 80 px between time ticks, wider than a label ("12:45pm", "12/4"):
    // uPlot's default 50 px lets them run into each other at the 6 h range
    axes: [{ space: 80 },
      { values: (u, ticks) => ticks.map((t) => bytes(t)), size: 76, incrs: BYTE_STEPS }],
    series: [
      {},
      { label: "CRM egress", stroke: "#2563eb", width: 1.5, value },
      { label: "all egress", stroke: "#94a3b8", width: 1, value },
      { label: "expected", stroke: "#15803d", width: 1, dash: [5, 4], value, spanGaps: false },
      { label: "band low", stroke: "rgba(21, 128, 61, 0.35)", width: 1, value },
      { label: "band high", stroke: "rgba(21, 128, 61, 0.35)", width: 1, value },
    ],
    bands: [{ series: [5, 4], fill: "rgba(34, 197, 94, 0.14)" }],
    hooks: { draw: [(u) => drawOpenMinute(u, holder.openMinute),
                    (u) => drawAlerts(u, holder.alerts)] },
  };
}

function tenantCard(tenant) {
  const chart = el("div", { class: "chart" });
  const card = el("article", { class: "tenant-card", "data-tenant": tenant },
    el("h3", {}, tenant, el("span", { class: "totals" })), chart,
    el("p", { class: "chart-alerts" }));
  return { card, chart, plot: null, alerts: [], openMinute: null };
}

async function renderVolumes(tenants, alerts) {
  // up to the open minute included: the agent stores what it drained of it every second
  // (the API marks it partial), so what was just sent shows at the next refresh
  const until = (Math.floor(Date.now() / 60000) + 1) * 60;
  const since = until - Number($("range").value);
  const alerting = new Set(alerts.filter((a) => a.status !== "resolved").map((a) => a.tenant));
  const shown = tenants
    .filter((t) => t.bytes_out > 0 || alerting.has(t.tenant))
    .sort((a, b) => alerting.has(b.tenant) - alerting.has(a.tenant) || b.bytes_out - a.bytes_out)
    .slice(0, MAX_CHARTS);
  const volumes = await Promise.all(shown.map((t) =>
    api(`/v1/tenants/${encodeURIComponent(t.tenant)}/volume?since=${since}&until=${until}`)));
  const charts = $("charts");
  for (const [name, holder] of state.charts) {
    if (!shown.some((t) => t.tenant === name)) { holder.plot && holder.plot.destroy(); holder.card.remove(); state.charts.delete(name); }
  }
  shown.forEach((t, i) => {
    let holder = state.charts.get(t.tenant);
    if (!holder) { holder = tenantCard(t.tenant); state.charts.set(t.tenant, holder); }
    charts.append(holder.card); // keeps the order of `shown`
    holder.alerts = alerts.filter((a) => a.tenant === t.tenant && a.last_seen + 60 >= since);
    const data = seriesData(volumes[i].body, since, until);
    const crm = data[1].reduce((s, v) => s + v, 0);
    const open = volumes[i].body.series.find((p) => p.partial);
    holder.openMinute = open ? open.ts : null;
    holder.card.dataset.crmBytes = String(crm);
    holder.card.querySelector(".totals").textContent =
      ` · ${bytes(crm)} to CRMs, ${bytes(data[2].reduce((s, v) => s + v, 0))} in all` +
      (open ? ` (${bytes(open.crm_bytes_out)} of it this minute, still counting)` : "");
    const fitted = data[3].some((v) => v !== null);
    holder.card.querySelector(".chart-alerts").textContent =
      `${holder.alerts.length} alert(s) in view` + (fitted ? "" : " · no baseline yet (warm-up)");
    holder.card.dataset.alerts = String(holder.alerts.length);
    if (holder.plot) holder.plot.setData(data);
    else holder.plot = new uPlot(chartOptions(holder.chart.clientWidth || 800, holder), data, holder.chart);
  });
}

// -- counters -----------------------------------------------------------------

function renderStats(stats) {
  const lost = stats.losses.reduce((s, l) => s + l.count, 0);
  const pill = $("loss-total");
  pill.textContent = lost ? `${lost.toLocaleString()} events lost` : "no events lost";
  pill.className = `pill ${lost ? "bad" : "good"}`;
  $("losses").tBodies[0].replaceChildren(...stats.losses.map((l) =>
    el("tr", { class: l.count ? "lost" : "zero" },
      el("td", { class: "mono" }, l.ring), el("td", {}, l.reason),
      el("td", { class: "num" }, l.count.toLocaleString()),
      el("td", {}, l.count ? l.remedy || "" : ""))));
  const counters = { ...stats.kernel, ...stats.plaintext, unattributed_bytes: stats.unattributed_bytes };
  $("kernel").tBodies[0].replaceChildren(...Object.entries(counters).map(([k, v]) =>
    el("tr", {}, el("td", { class: "mono" }, k), el("td", { class: "num" }, v.toLocaleString()))));
}

function renderReady({ status, body }) {
  const pill = $("ready");
  const ifaces = Object.entries(body.attached || {}).map(([i, m]) => `${i} (${m})`).join(", ");
  const degraded = status === 200 && body.status === "degraded";
  pill.textContent = status !== 200 ? `not ready: ${body.detail}`
    : degraded ? `degraded · ${body.degraded.join("; ")}` : `ready · ${ifaces}`;
  pill.className = `pill ${status === 200 && !degraded ? "good" : "bad"}`;
}

function renderSinks({ body }) {
  const retry = (name) => async () => {
    await api(`/v1/sinks/${encodeURIComponent(name)}/retry`, { method: "POST" });
    refresh();
  };
  $("sinks").tBodies[0].replaceChildren(...(body.sinks || []).map((s) =>
    el("tr", { class: s.failed ? "lost" : "zero" },
      el("td", { class: "mono" }, s.sink), el("td", { class: "num" }, String(s.pending)),
      el("td", { class: "num" }, String(s.delivered)), el("td", { class: "num" }, String(s.failed)),
      el("td", {}, s.last_error || ""),
      el("td", {}, s.failed && s.configured && state.role === "admin"
        ? el("button", { onclick: retry(s.sink) }, "Re-send") : null))));
}

// -- plaintext coverage ----------------------------------------------------------

function renderCoverage({ body }) {
  const processes = body.processes || [];
  const seen = processes.filter((p) => p.inspected).length;
  $("coverage-count").textContent = processes.length ? `${seen} of ${processes.length} inspected` : "";
  $("no-coverage").hidden = processes.length > 0;
  $("coverage").tBodies[0].replaceChildren(...processes.map((p) =>
    el("tr", { class: p.inspected ? "zero" : "lost" },
      el("td", { class: "num" }, p.pid === null ? "—" : String(p.pid)),
      el("td", { class: "mono", title: p.exe || "" }, p.comm || p.exe || "(exited)"),
      el("td", {}, p.tenant), el("td", { class: "mono" }, p.destinations.join(", ")),
      el("td", {}, p.tls), el("td", {}, p.inspected ? "yes" : "no"),
      el("td", {}, p.inspected ? "" : p.reason))));
}

// -- CRM data flows --------------------------------------------------------------

const ARROWS = { to_crm: "→", from_crm: "←" }; // written to the CRM, read from it

// tenant -> object -> instance, summed over processes and operations
function renderDataflows({ body }) {
  const flows = body.dataflows || [];
  const groups = new Map();
  for (const f of flows) {
    const key = [f.tenant, f.crm_vendor, f.object, f.crm_instance || ""].join("\u0000");
    let g = groups.get(key);
    if (!g) {
      g = { tenant: f.tenant, vendor: f.crm_vendor, object: f.object, instance: f.crm_instance,
            ops: new Set(), requests: 0, records: 0, bytes: 0, failed: 0,
            classes: new Set(), exes: new Set(), last: 0 };
      groups.set(key, g);
    }
    g.ops.add(`${f.operation} ${ARROWS[f.direction] || ""}`);
    g.requests += f.requests;
    g.records += f.records;
    g.bytes += f.request_bytes + f.response_bytes;
    g.failed += f.outcomes["4xx"] + f.outcomes["5xx"] + f.outcomes.none;
    f.data_classes.forEach((c) => g.classes.add(c));
    g.exes.add(f.exe);
    g.last = Math.max(g.last, f.last_seen);
  }
  const rows = [...groups.values()].sort((a, b) => a.tenant.localeCompare(b.tenant)
    || `${a.vendor}:${a.object}`.localeCompare(`${b.vendor}:${b.object}`)
    || (a.instance || "").localeCompare(b.instance || ""));
  let tenant = null;
  let object = null;
  $("dataflows").tBodies[0].replaceChildren(...rows.map((g) => {
    const firstOfTenant = g.tenant !== tenant;
    const firstOfObject = firstOfTenant || `${g.vendor}:${g.object}` !== object;
    tenant = g.tenant;
    object = `${g.vendor}:${g.object}`;
    const exes = [...g.exes].sort();
    return el("tr", { class: firstOfTenant ? "first" : "", "data-tenant": g.tenant,
                      "data-object": g.object, "data-instance": g.instance || "" },
      el("td", {}, firstOfTenant ? g.tenant : ""),
      el("td", {}, firstOfObject ? `${g.object} (${g.vendor})` : ""),
      el("td", { class: "mono" }, g.instance || "(shared host)"),
      el("td", {}, [...g.ops].sort().join(", ")),
      el("td", { class: "num requests" }, String(g.requests)),
      el("td", { class: "num records" }, String(g.records)),
      el("td", { class: "num" }, bytes(g.bytes)),
      el("td", { class: g.failed ? "num lost" : "num" }, String(g.failed)),
      el("td", {}, [...g.classes].sort().join(", ")),
      el("td", { class: "mono", title: exes.join("\n") }, exes.map((e) => e.split("/").pop()).join(", ")),
      el("td", {}, when(g.last)));
  }));
  $("dataflow-count").textContent = groups.size ? `${groups.size} object flows` : "";
  $("no-dataflows").hidden = flows.length > 0;
}

// -- the loop -----------------------------------------------------------------

async function refresh() {
  clearTimeout(state.timer);
  try {
    const since = Math.floor(Date.now() / 1000) - Number($("range").value);
    const [ready, tenants, alerts, stats, sinks, coverage, dataflows] = await Promise.all([
      api("/readyz"), api("/v1/tenants"), api("/v1/alerts?limit=200"), api("/v1/stats"),
      api("/v1/sinks"), api("/v1/coverage"), api(`/v1/dataflows?since=${since}`),
    ]);
    const active = alerts.body.alerts.filter((a) => a.status !== "resolved");
    renderReady(ready);
    renderAlerts(active);
    renderStats(stats.body);
    renderSinks(sinks);
    renderCoverage(coverage);
    renderDataflows(dataflows);
    await renderVolumes(tenants.body.tenants, alerts.body.alerts);
    $("updated").textContent = new Date().toLocaleTimeString();
    problem(null);
  } catch (e) {
    problem(`Refresh failed: ${e.message}`);
  }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

async function start() {
  const who = await api("/v1/whoami");
  state.role = who.body.role;
  $("role").textContent = state.role;
  $("role").className = `pill role ${state.role}`;
  $("range").addEventListener("change", refresh);
  $("show-acked").addEventListener("change", refresh);
  $("sign-out").addEventListener("click", async () => {
    await api("/v1/session", { method: "DELETE" }).catch(() => {});
    location.replace("/");
  });
  window.addEventListener("resize", () => {
    for (const h of state.charts.values()) h.plot && h.plot.setSize({ width: h.chart.clientWidth, height: 220 });
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  await refresh();
  document.body.dataset.ready = "true"; // for tests: the first render is complete
}

start().catch((e) => problem(`Cannot start: ${e.message}`));
