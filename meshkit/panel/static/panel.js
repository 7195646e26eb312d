// meshkit panel: one WebSocket (/ws) for state and tap events, /api/trace/{id} for waterfalls.
// Everything shown comes from remote peers, so text goes in with textContent, never as HTML.
"use strict";

const FLOW_ROWS = 300; // rows kept in the live flow table
const $ = (sel) => document.querySelector(sel);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "class") node.className = value;
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function cell(value, cls) { return el("td", cls ? { class: cls } : {}, value === null || value === undefined ? "–" : value); }
function fmtUs(us) {
  if (us === null || us === undefined) return "–";
  if (us < 1000) return us.toFixed(0) + " µs";
  if (us < 1e6) return (us / 1000).toFixed(us < 1e4 ? 2 : 1) + " ms";
  return (us / 1e6).toFixed(2) + " s";
}
function fmtRate(r) { return r === null || r === undefined ? "–" : r.toFixed(r < 10 ? 2 : 0); }
function fmtAge(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  if (seconds < 120) return seconds.toFixed(0) + "s";
  if (seconds < 7200) return (seconds / 60).toFixed(0) + "m";
  return (seconds / 3600).toFixed(1) + "h";
}
function fill(tbody, rows) { tbody.replaceChildren(...rows); }
function traceLink(id) {
  return el("a", { class: "trace", title: "show this trace", "data-trace": id, on: { click: () => showTrace(id) } },
            String(id).slice(0, 12) + "…");
}

// -- state ----------------------------------------------------------------------------

function renderState(state) {
  $("#refreshed").textContent = "read " + new Date(state.at * 1000).toLocaleTimeString() +
    (state.polled < state.instances ? ` (${state.polled} of ${state.instances} instances read)` : "");
  renderTopology(state.topology || { services: [], edges: [] });
  renderMethods(state.methods || []);
  renderTraces(state.traces || []);
  renderCircus(state.circus);
  renderHAProxy(state.haproxy);
}

function renderTopology(topo) {
  const now = Date.now() / 1000;
  const rows = [];
  for (const service of topo.services) {
    for (const host of service.hosts) {
      for (const inst of host.instances) {
        rows.push(el("tr", { class: "instance", "data-service": service.name, "data-instance": inst.instance,
                             title: "look inside", on: { click: () => inspect(inst.instance) } },
          cell(service.name), cell(host.host), cell(inst.instance), cell(inst.pid, "num"),
          cell(inst.state, "state-" + inst.state), cell(inst.version || ""),
          cell(inst.started_at ? fmtAge(now - inst.started_at) : null, "num")));
      }
    }
  }
  fill($("#instances tbody"), rows);
  drawGraph(topo);
}

function drawGraph(topo) {
  // Services in columns by call depth (callers left of callees; pushes and cycles do not move them),
  // edges as curves bent to one side so that A→B and B→A stay apart; pushes dashed.
  const svg = $("#graph");
  const ns = "http://www.w3.org/2000/svg";
  const svgEl = (tag, attrs) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    return node;
  };
  const names = topo.services.map((s) => s.name);
  const depth = Object.fromEntries(names.map((n) => [n, 0]));
  const calls = topo.edges.filter((e) => e.kind !== "push" && e.from !== e.to);
  for (let pass = 0; pass < Math.min(names.length, 8); pass++) {
    for (const e of calls) if (e.from in depth && e.to in depth && depth[e.to] <= depth[e.from]) depth[e.to] = depth[e.from] + 1;
  }
  const columns = {};
  for (const n of names) (columns[Math.min(depth[n], 8)] ||= []).push(n);
  const keys = Object.keys(columns).map(Number).sort((a, b) => a - b);
  const width = svg.clientWidth || 600;
  const rowsMax = Math.max(1, ...Object.values(columns).map((c) => c.length));
  const height = Math.max(120, rowsMax * 50 + 30);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.style.height = height + "px";
  const step = keys.length > 1 ? (width - 170) / (keys.length - 1) : 0;
  const pos = {};
  keys.forEach((col, ci) => columns[col].forEach((n, ri) => { pos[n] = { x: 20 + ci * step, y: 20 + ri * 50 }; }));
  const count = Object.fromEntries(topo.services.map((s) => [s.name, s.hosts.reduce((k, h) => k + h.instances.length, 0)]));
  const defs = svgEl("defs", {});
  defs.innerHTML = '<marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0L10,5L0,10z" fill="#6b6f73"/></marker>';
  const nodes = [defs];
  for (const e of topo.edges) {
    const a = pos[e.from], b = pos[e.to];
    if (!a || !b || e.from === e.to) continue;
    const forward = a.x <= b.x;
    const x1 = forward ? a.x + 130 : a.x, x2 = forward ? b.x : b.x + 130;
    const y1 = a.y + 14, y2 = b.y + 14;
    const bend = (forward ? -1 : 1) * (18 + Math.abs(y2 - y1) / 4);
    const mx = (x1 + x2) / 2, my = (y1 + y2) / 2 + bend;
    nodes.push(svgEl("path", { d: `M${x1},${y1} Q${mx},${my} ${x2},${y2}`, fill: "none", stroke: "#6b6f73",
      "stroke-dasharray": e.kind === "push" ? "4 3" : "", "marker-end": "url(#arrow)", class: "edge",
      "data-edge": e.from + ">" + e.to, "data-kind": e.kind || "call" }));
    // The label sits on the curve, a third of the way from its caller (the Bézier's point at t),
    // so that labels of edges that meet at one service do not land on each other.
    const t = 0.33, u = 1 - t;
    const label = svgEl("text", { x: u * u * x1 + 2 * u * t * mx + t * t * x2,
      y: u * u * y1 + 2 * u * t * my + t * t * y2 - 3, "text-anchor": "middle" });
    label.textContent = `${e.calls} ${e.kind === "push" ? "push" : "call"}${e.calls === 1 ? "" : e.kind === "push" ? "es" : "s"}` +
      (e.errors ? `, ${e.errors} failed` : "");
    if (e.errors) label.setAttribute("fill", "#c53030");
    nodes.push(label);
  }
  for (const n of names) {
    const g = svgEl("g", { class: "node", "data-service": n });
    g.append(svgEl("rect", { x: pos[n].x, y: pos[n].y, width: 130, height: 28, rx: 4,
      fill: count[n] ? "#e8f1fb" : "#f6e7e7", stroke: "#3b6fb6" }));
    const text = svgEl("text", { x: pos[n].x + 8, y: pos[n].y + 18 });
    text.textContent = `${n} ×${count[n] || 0}`;
    g.append(text);
    nodes.push(g);
  }
  svg.replaceChildren(...nodes);
}

function renderMethods(rows) {
  fill($("#methods tbody"), rows.map((r) => el("tr", { class: "method", "data-method": r.service + "." + r.method },
    cell(r.service), cell(r.kind === "push" ? `${r.method} (push)` : r.method), cell(r.instances, "num"), cell(fmtRate(r.rate), "num"),
    cell(fmtRate(r.error_rate), "num"), cell(fmtUs(r.p50_us), "num"), cell(fmtUs(r.p99_us), "num"),
    cell(r.in_flight, "num"), cell(r.calls, "num"), cell(r.errors, "num"),
    cell(r.last_error ? `${r.last_error.code}: ${r.last_error.message || ""}` : "", r.last_error ? "wrap status-error" : "wrap"))));
}

function renderTraces(traces) {
  fill($("#traces tbody"), traces.map((t) => el("tr", { class: "recent-trace" },
    el("td", {}, traceLink(t.trace_id)), cell(`${t.service} ${t.name}`), cell(fmtUs(t.duration_us), "num"),
    cell(t.failed ? "failed" : "", t.failed ? "status-error" : ""))));
}

function renderCircus(circus) {
  $("#circus-note").textContent = circus === null ? "no stack run directory: Circus not shown" : (circus.error || "");
  const watchers = (circus && circus.watchers) || [];
  fill($("#circus tbody"), watchers.map((w) => el("tr", { class: "watcher", "data-watcher": w.name },
    cell(w.name), cell(w.status, w.flapped ? "flapped" : "state-" + w.status), cell(w.numprocesses, "num"),
    cell(w.processes.map((p) => `${p.pid} (${fmtAge(p.age_s)})`).join(", "), "wrap"),
    cell(w.restarts, "num"), cell(w.abnormal_exits, w.abnormal_exits ? "num status-error" : "num"),
    cell(w.last_exit_at ? `code ${w.last_exit_code} at ${new Date(w.last_exit_at * 1000).toLocaleTimeString()}` : "", "wrap"))));
}

function renderHAProxy(haproxy) {
  $("#haproxy-note").textContent = haproxy === null ? "no stack run directory: HAProxy not shown" : (haproxy.error || "");
  const servers = (haproxy && haproxy.servers) || [];
  fill($("#haproxy tbody"), servers.map((s) => el("tr", { class: "server", "data-server": s.name },
    cell(s.backend), cell(s.name), cell(s.address), cell(s.state, "state-" + s.state), cell(s.checked ? "yes" : "no"))));
}

// -- one instance -----------------------------------------------------------------------

async function inspect(id) {
  const box = $("#inspect");
  box.textContent = `asking ${id}…`;
  let answer;
  try {
    answer = await (await fetch("/api/instance/" + encodeURIComponent(id))).json();
  } catch (err) { box.textContent = "failed: " + err; return; }
  if (answer.error) { box.textContent = `${id}: ${answer.error}`; return; }
  const i = answer.info || {};
  const facts = [`${i.service} ${i.instance}${i.version ? " v" + i.version : ""} on ${i.host}, pid ${i.pid}, ${i.state}, up ${fmtAge(i.uptime_s)}`,
    `in flight ${i.in_flight}, held ${JSON.stringify(i.held || {})}, spans kept ${(i.spans || {}).kept}, taps open ${i.taps_open}`];
  const parts = [el("h3", {}, `instance ${id}`), ...facts.map((f) => el("div", {}, f))];
  if ((i.methods || []).length) parts.push(el("div", { class: "methods-list" }, "methods: " + i.methods.map((m) => m.signature).join(", ")));
  for (const crash of i.recent_crashes || []) parts.push(el("div", { class: "status-error" }, "crash: " + JSON.stringify(crash)));
  if (i.periodic_failures && Object.keys(i.periodic_failures).length) parts.push(el("div", { class: "status-error" }, "periodic failures: " + JSON.stringify(i.periodic_failures)));
  const inflight = answer.inflight || [];
  parts.push(el("div", {}, `${inflight.length} calls in flight now`));
  for (const c of inflight) parts.push(el("div", {}, `${c.method} from ${c.caller} for ${c.age_ms} ms `, c.trace_id ? traceLink(c.trace_id) : ""));
  const errors = answer.errors || [];
  if (errors.length) parts.push(el("div", {}, "recent failures: ", ...errors.slice(0, 10).flatMap((e) => [traceLink(e.trace_id), ` ${e.name} ${e.status}; `])));
  box.className = "";
  box.replaceChildren(...parts);
}

// -- live flow ------------------------------------------------------------------------

function addEvent(msg) {
  const e = msg.event || {};
  // A server span is named by its method, a client span by service.method already.
  const name = e.name && e.name.includes(".") ? e.name : [e.service, e.name || e.method].filter(Boolean).join(".");
  const at = e.start_unix_us ? new Date(e.start_unix_us / 1000) : new Date();
  const extra = [];
  if (e.meta && Object.keys(e.meta).length) extra.push(Object.entries(e.meta).map(([k, v]) => `${k}=${v}`).join(" "));
  if (e.args) extra.push(e.args);
  const row = el("tr", { class: "flow-row", "data-service": e.service || "", "data-trace": e.trace_id || "" },
    cell(at.toLocaleTimeString()), cell(name), cell(msg.instance), cell(e.duration_us !== undefined ? (e.duration_us / 1000).toFixed(2) : null, "num"),
    cell(e.status, "status-" + (e.status === "ok" ? "ok" : "error")),
    e.trace_id ? el("td", {}, traceLink(e.trace_id)) : cell(null), cell(extra.join(" · ")));
  const body = $("#flow tbody");
  body.prepend(row);
  while (body.rows.length > FLOW_ROWS) body.deleteRow(body.rows.length - 1);
}

function readFilter() {
  const filter = {};
  const service = $("#filter-service").value.trim(), method = $("#filter-method").value.trim();
  if (service) filter.service = service;
  if (method) filter.method = method;
  const where = {};
  for (const part of $("#filter-where").value.split(",")) {
    const [key, ...rest] = part.split("=");
    if (key.trim() && rest.length) where[key.trim()] = rest.join("=").trim();
  }
  if (Object.keys(where).length) filter.where = where;
  if ($("#filter-errors").checked) filter.errors_only = true;
  const latency = parseFloat($("#filter-latency").value);
  if (latency > 0) filter.min_latency_ms = latency;
  return filter;
}

// -- trace waterfall --------------------------------------------------------------------

async function showTrace(id) {
  $("#trace-id").value = id;
  $("#trace-state").textContent = "asking every instance…";
  let answer;
  try {
    const response = await fetch("/api/trace/" + encodeURIComponent(id.trim()));
    answer = await response.json();
  } catch (err) {
    $("#trace-state").textContent = "failed: " + err;
    return;
  }
  if (answer.error) { $("#trace-state").textContent = answer.error; $("#waterfall").replaceChildren(); return; }
  $("#trace-state").textContent = `${answer.spans.length} spans`;
  renderWaterfall(answer.spans);
}

function renderWaterfall(spans) {
  // Tree order (children under their parent, by start), bars placed on the trace's own time axis.
  const byId = new Map(spans.map((s) => [s.span_id, s]));
  const children = new Map();
  const roots = [];
  for (const s of spans) {
    if (s.parent_id && byId.has(s.parent_id)) (children.get(s.parent_id) || children.set(s.parent_id, []).get(s.parent_id)).push(s);
    else roots.push(s);
  }
  const start = Math.min(...spans.map((s) => s.start_unix_us));
  const end = Math.max(...spans.map((s) => s.start_unix_us + s.duration_us));
  const total = Math.max(1, end - start);
  const rows = [];
  const walk = (span, level) => {
    const bar = el("div", { class: "bar" + (span.status && span.status !== "ok" ? " error" : "") });
    bar.style.left = ((span.start_unix_us - start) / total * 100) + "%";
    bar.style.width = (span.duration_us / total * 100) + "%";
    const label = el("div", { class: "label", title: `${span.service} ${span.instance} ${span.host || ""}` },
      "\u00a0".repeat(level * 3) + `${span.service} · ${span.name} (${span.kind || ""})`);
    rows.push(el("div", { class: "span-row", "data-service": span.service, "data-span": span.span_id },
      label, el("div", { class: "track" }, bar),
      el("div", { class: "num" }, `+${fmtUs(span.start_unix_us - start)} ${fmtUs(span.duration_us)}`)));
    const attrs = Object.entries(span.attrs || {});
    if (attrs.length || (span.status && span.status !== "ok")) {
      rows.push(el("div", { class: "attrs" }, [`instance ${span.instance}`, `status ${span.status}`,
        ...attrs.map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)].join("  ")));
    }
    for (const child of (children.get(span.span_id) || []).sort((a, b) => a.start_unix_us - b.start_unix_us)) walk(child, level + 1);
  };
  for (const root of roots.sort((a, b) => a.start_unix_us - b.start_unix_us)) walk(root, 0);
  $("#waterfall").replaceChildren(...rows);
}

// -- the socket -------------------------------------------------------------------------

let socket = null;

function connect() {
  socket = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  socket.onopen = () => { $("#status").textContent = "live"; $("#status").className = "status live"; };
  socket.onclose = () => {
    $("#status").textContent = "disconnected, retrying"; $("#status").className = "status down";
    $("#tap-state").textContent = "not tapping";
    setTimeout(connect, 2000);
  };
  socket.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.type === "state") renderState(msg);
    else if (msg.type === "event") addEvent(msg);
    else if (msg.type === "tap" && msg.state === "limited") {
      $("#notice").textContent = `rate limit: ${msg.instance} left out ${msg.dropped} events`;
    } else if (msg.type === "tap") {
      $("#tap-state").textContent = msg.state === "open"
        ? `tapping ${JSON.stringify(msg.filter)} on ${msg.instances.length} instances, at most ${msg.max_rps}/s`
        : msg.state === "closed" ? "not tapping"
        : `tap on ${msg.instance} ended`;
    } else if (msg.type === "dropped") $("#notice").textContent = `this tab was slow: ${msg.count} updates dropped`;
    else if (msg.type === "error") $("#notice").textContent = "refused: " + msg.message;
  };
}

function send(obj) { if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(obj)); }

$("#tap-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  $("#flow tbody").replaceChildren();
  $("#notice").textContent = "";
  const rps = parseFloat($("#filter-rps").value);
  send({ op: "tap", filter: readFilter(), max_rps: rps > 0 ? rps : 20 });
});
$("#tap-stop").addEventListener("click", () => send({ op: "untap" }));
$("#trace-form").addEventListener("submit", (ev) => { ev.preventDefault(); showTrace($("#trace-id").value.trim()); });
connect();
