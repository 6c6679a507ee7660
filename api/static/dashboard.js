// Operator dashboard for DeFi Q&A Bot: polls /health-status, /performance-stats and /system-metrics and draws
// small canvas charts; every 60 s reads /admin/insights for the missing-topics and disputed-entries panel.
// No third-party code. `?token=` is sent as a Bearer header; `?refresh=N` sets the period (s).
"use strict";

const params = new URLSearchParams(window.location.search);
const token = params.get("token");
const refreshSeconds = Math.min(60, Math.max(1, Number(params.get("refresh")) || 5));
const COLORS = { ok: "#3454d1", client: "#e0a100", bad: "#c93030", line: "#3454d1", cpu: "#7a42c8", grid: "#eef0f5", text: "#5b6275" };
const localHistory = { lag: [], cpu: [] }; // collected by this page, one point per refresh
const HISTORY_POINTS = 120;
let refreshes = 0;

function $(id) { return document.getElementById(id); }

function setText(id, value) { $(id).textContent = value; }

function fmtNumber(value, digits = 0) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function fmtPercent(share) {
  return share === null || share === undefined ? "–" : (share * 100).toFixed(1) + " %";
}

function fmtBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return value.toFixed(unit === 0 ? 0 : 1) + " " + units[unit];
}

function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}

async function getJson(path) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, { headers, cache: "no-store" });
  const body = await response.json().catch(() => null);
  // /health-status answers 503 with a full report when the service is unhealthy: still worth showing.
  if (!response.ok && !(path === "/health-status" && response.status === 503 && body)) {
    const detail = body && body.detail ? body.detail : response.statusText;
    throw new Error(path + ": HTTP " + response.status + " " + detail);
  }
  return body;
}

// --- charts ---------------------------------------------------------------------------------------------------

function prepareCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width;
  const height = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  return { ctx, width, height };
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function drawAxes(ctx, width, height, max, pad) {
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.text;
  ctx.font = "10px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (const fraction of [0, 0.5, 1]) {
    const y = pad.top + (height - pad.top - pad.bottom) * (1 - fraction);
    ctx.beginPath();
    ctx.moveTo(pad.left, y);
    ctx.lineTo(width - pad.right, y);
    ctx.stroke();
    ctx.fillText(String(+(max * fraction).toPrecision(3)), 2, y + 3);
  }
}

// Stacked bars: `series` is [{values: [...], color}], all of one length.
function drawBars(canvas, series) {
  const { ctx, width, height } = prepareCanvas(canvas);
  const pad = { left: 34, right: 4, top: 6, bottom: 14 };
  const count = series[0].values.length;
  const totals = Array.from({ length: count }, (_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
  const max = niceMax(Math.max(0, ...totals));
  drawAxes(ctx, width, height, max, pad);
  const plotWidth = width - pad.left - pad.right;
  const plotHeight = height - pad.top - pad.bottom;
  const slot = plotWidth / Math.max(1, count);
  for (let i = 0; i < count; i += 1) {
    let base = height - pad.bottom;
    for (const s of series) {
      const barHeight = ((s.values[i] || 0) / max) * plotHeight;
      ctx.fillStyle = s.color;
      ctx.fillRect(pad.left + i * slot + 1, base - barHeight, Math.max(1, slot - 2), barHeight);
      base -= barHeight;
    }
  }
  ctx.fillStyle = COLORS.text;
  ctx.fillText("now", width - pad.right - 20, height - 2);
}

// Lines: `series` is [{values: [number|null], color}]; nulls leave gaps.
function drawLines(canvas, series) {
  const { ctx, width, height } = prepareCanvas(canvas);
  const pad = { left: 34, right: 4, top: 6, bottom: 14 };
  const all = series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
  const max = niceMax(Math.max(0, ...all));
  drawAxes(ctx, width, height, max, pad);
  const plotWidth = width - pad.left - pad.right;
  const plotHeight = height - pad.top - pad.bottom;
  for (const s of series) {
    const count = s.values.length;
    const step = plotWidth / Math.max(1, count - 1);
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let drawing = false;
    s.values.forEach((value, i) => {
      if (value === null || value === undefined) { drawing = false; return; }
      const x = pad.left + i * step;
      const y = height - pad.bottom - (value / max) * plotHeight;
      if (drawing) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      drawing = true;
      if (count < 40) ctx.fillRect(x - 1.5, y - 1.5, 3, 3);
    });
    ctx.stroke();
  }
  ctx.fillStyle = COLORS.text;
  ctx.fillText("now", width - pad.right - 20, height - 2);
}

// --- rendering ------------------------------------------------------------------------------------------------

function renderHealth(health) {
  const badge = $("overall-status");
  badge.textContent = health.status;
  badge.className = "badge " + health.status;
  const list = $("components");
  list.replaceChildren();
  const details = health.component_details || {};
  for (const [name, status] of Object.entries(health.components)) {
    const component = details[name] || { status, detail: "" };
    const item = document.createElement("li");
    item.dataset.component = name;
    item.dataset.status = component.status;
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const status = document.createElement("span");
    status.className = "badge " + component.status;
    status.textContent = component.status;
    const detail = document.createElement("span");
    detail.className = "muted";
    detail.textContent = component.detail;
    item.append(label, status, detail);
    list.append(item);
  }
  const metrics = health.metrics;
  setText("sessions", fmtNumber(metrics.active_sessions));
  setText("ws-connections", fmtNumber(metrics.websocket_connections));
  setText("sse-streams", fmtNumber(metrics.sse_streams_active));
}

function renderPerformance(perf) {
  const total = perf.requests.total;
  setText("req-rate", fmtNumber(total.requests_per_second, 2));
  setText("req-count", fmtNumber(total.requests));
  setText("lat-p50", fmtNumber(total.p50_ms, 1));
  setText("lat-p95", fmtNumber(total.p95_ms, 1));
  setText("lat-p99", fmtNumber(total.p99_ms, 1));
  setText("error-rate", fmtPercent(total.error_rate));
  setText("client-error-rate", fmtPercent(total.client_error_rate));
  setText("window-label", "last " + Math.round(perf.requests.window_seconds / 60) + " minutes");

  const cache = perf.cache;
  setText("cache-hit-rate", fmtPercent(cache.hit_rate));
  const layers = Object.entries(cache.layers).map(
    ([name, layer]) => name + ": " + layer.hits + " hits / " + layer.misses + " misses"
  );
  setText("cache-layers", layers.length ? layers.join(" · ") : "caching disabled");

  const answers = perf.answers;
  setText("answered", fmtNumber(answers.answered));
  setText("no-match", fmtNumber(answers.no_match));
  setText("answer-errors", fmtNumber(answers.error));
  setText("answered-share", fmtPercent(answers.answered_share));
  setText("avg-confidence", fmtNumber(answers.avg_confidence, 3));

  const rows = perf.requests.routes.map((route) => {
    const row = document.createElement("tr");
    row.dataset.route = route.method + " " + route.route;
    const cells = [route.method, route.route, route.requests, fmtNumber(route.p50_ms, 1), fmtNumber(route.p95_ms, 1),
      fmtNumber(route.p99_ms, 1), route.errors, route.client_errors];
    cells.forEach((value, index) => {
      const cell = document.createElement("td");
      cell.textContent = String(value);
      if (index >= 2) cell.className = "num";
      row.append(cell);
    });
    return row;
  });
  if (!rows.length) {
    const row = document.createElement("tr");
    const cell = document.createElement("td");
    cell.colSpan = 8;
    cell.className = "muted";
    cell.textContent = "No requests in the window yet.";
    row.append(cell);
    rows.push(row);
  }
  $("routes").replaceChildren(...rows);

  const timeline = perf.requests.timeline;
  drawBars($("chart-requests"), [
    { values: timeline.map((b) => b.requests - b.errors - b.client_errors), color: COLORS.ok },
    { values: timeline.map((b) => b.client_errors), color: COLORS.client },
    { values: timeline.map((b) => b.errors), color: COLORS.bad },
  ]);
  drawLines($("chart-latency"), [{ values: timeline.map((b) => b.p95_ms), color: COLORS.line }]);
  const answerTimeline = answers.timeline;
  drawBars($("chart-answers"), [
    { values: answerTimeline.map((b) => b.answered), color: COLORS.ok },
    { values: answerTimeline.map((b) => b.no_match), color: COLORS.client },
    { values: answerTimeline.map((b) => b.error), color: COLORS.bad },
  ]);
}

function renderSystem(system) {
  const process = system.process;
  const lag = system.event_loop_lag;
  setText("cpu", fmtNumber(process.cpu_percent, 1) + " % / " + fmtNumber(system.cpu.percent, 1) + " % of " + system.cpu.count + " cores");
  setText("rss", fmtBytes(process.rss_bytes));
  setText("host-memory", fmtPercent(system.memory.percent / 100) + " of " + fmtBytes(system.memory.total_bytes));
  setText("fds", fmtNumber(process.open_fds));
  setText("threads", fmtNumber(process.threads));
  setText("uptime", fmtDuration(system.uptime_seconds));
  setText("loop-lag", fmtNumber(lag.current_ms, 2) + " ms / " + fmtNumber(lag.max_ms, 2) + " ms");
  localHistory.lag.push(lag.current_ms);
  localHistory.cpu.push(process.cpu_percent);
  for (const values of Object.values(localHistory)) if (values.length > HISTORY_POINTS) values.shift();
  drawLines($("chart-system"), [
    { values: localHistory.lag, color: COLORS.line },
    { values: localHistory.cpu, color: COLORS.cpu },
  ]);
}

async function refresh() {
  const results = await Promise.allSettled([getJson("/health-status"), getJson("/performance-stats"), getJson("/system-metrics")]);
  const [health, perf, system] = results;
  if (health.status === "fulfilled") renderHealth(health.value);
  if (perf.status === "fulfilled") renderPerformance(perf.value);
  if (system.status === "fulfilled") renderSystem(system.value);
  const failures = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  const problem = $("problem");
  problem.hidden = failures.length === 0;
  problem.textContent = failures.length ? "Could not load: " + failures.join("; ") : "";
  refreshes += 1;
  document.body.dataset.refreshes = String(refreshes);
  setText("updated", "updated " + new Date().toLocaleTimeString());
}

// --- insights (/admin/insights): missing topics and disputed entries, refreshed less often -------------------------

const INSIGHTS_DAYS = Math.min(365, Math.max(1, Number(params.get("days")) || 7));
const INSIGHTS_SECONDS = 60;
const INSIGHTS_ROWS = 10;

function cell(content, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (content instanceof Node) td.append(content); else td.textContent = content;
  return td;
}

function entryCell(id, question) {
  const wrapper = document.createElement("div");
  const title = document.createElement("div");
  title.textContent = question || id;
  const name = document.createElement("div");
  name.className = "entry-id";
  name.textContent = id;
  wrapper.append(title, name);
  return wrapper;
}

function placeholderRow(columns, text) {
  const row = document.createElement("tr");
  const td = cell(text, "muted");
  td.colSpan = columns;
  row.append(td);
  return row;
}

function renderInsights(report) {
  const topics = report.missing_topics.slice(0, INSIGHTS_ROWS).map((topic) => {
    const row = document.createElement("tr");
    const examples = document.createElement("ul");
    examples.className = "examples";
    for (const text of topic.examples) {
      const item = document.createElement("li");
      item.textContent = text;
      examples.append(item);
    }
    const nearest = topic.nearest_entry;
    row.append(
      cell(String(topic.count), "num"),
      cell(examples),
      nearest ? cell(entryCell(nearest.id, nearest.question)) : cell("–", "muted"),
      cell(nearest ? fmtNumber(nearest.score, 3) : "–", "num"),
    );
    return row;
  });
  $("missing-topics").replaceChildren(...(topics.length ? topics : [placeholderRow(4, "No declined questions in the period.")]));
  const disputed = report.disputed_entries.slice(0, INSIGHTS_ROWS).map((entry) => {
    const row = document.createElement("tr");
    const latest = entry.comments.length ? entry.comments[0].comment : "–";
    row.append(cell(entryCell(entry.entry_id, entry.question)), cell(String(entry.wrong), "num"),
      cell(String(entry.helpful), "num"), cell(latest, entry.comments.length ? "" : "muted"));
    return row;
  });
  $("disputed-entries").replaceChildren(...(disputed.length ? disputed : [placeholderRow(4, "No answer was rated wrong in the period.")]));
  document.body.dataset.insightsLoaded = "true";
}

async function insightsLoop() {
  try {
    renderInsights(await getJson("/admin/insights?days=" + INSIGHTS_DAYS));
  } catch (error) {
    $("missing-topics").replaceChildren(placeholderRow(4, "Could not load insights: " + error.message));
    $("disputed-entries").replaceChildren(placeholderRow(4, "Could not load insights: " + error.message));
  }
  window.setTimeout(insightsLoop, INSIGHTS_SECONDS * 1000);
}

async function loop() {
  try {
    await refresh();
  } catch (error) {
    $("problem").hidden = false;
    $("problem").textContent = "Refresh failed: " + error.message;
  }
  window.setTimeout(loop, refreshSeconds * 1000);
}

setText("refresh-seconds", String(refreshSeconds));
for (const span of document.querySelectorAll(".insights-days")) span.textContent = String(INSIGHTS_DAYS);
loop();
insightsLoop();
