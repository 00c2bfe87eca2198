// ritmo serve: the dashboard (no framework, no third-party code; charts are SVG drawn here).
// Every number shown carries the API's raw value in data-value (JSON), so what is rendered can be checked
// exactly against the API; the text is that value formatted by the fixed rules below (no locale).
"use strict";

const REFRESH_MS = 5000;
const TOKEN_KEY = "ritmo.apiToken";
const SVG_NS = "http://www.w3.org/2000/svg";

// ---- formatting (deterministic: the same text on every machine and locale) ----

function groupThousands(intText) {
  return intText.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
}

function fixed(x, digits) {
  if (x === null || x === undefined || typeof x !== "number" || !isFinite(x)) return "n/a";
  const text = Math.abs(x).toFixed(digits);
  const [i, f] = text.split(".");
  const sign = x < 0 && Number(text) !== 0 ? "-" : "";
  return sign + groupThousands(i) + (f !== undefined ? "." + f : "");
}

const fmt = {
  money: (x) => fixed(x, 2),
  signed: (x) => (typeof x === "number" && x > 0 && Number(x.toFixed(2)) !== 0 ? "+" : "") + fixed(x, 2),
  pct: (x) => (typeof x === "number" && isFinite(x) ? (x > 0 ? "+" : "") + fixed(x, 2) + "%" : "n/a"),
  prob: (x) => fixed(x, 3),
  qty: (x) => fixed(x, 6),
  price: (x) => fixed(x, 2),
  int: (x) => (typeof x === "number" ? String(x) : "n/a"),
  text: (x) => (x === null || x === undefined || x === "" ? "n/a" : String(x)),
  yesno: (x) => (x === null || x === undefined ? "n/a" : x ? "yes" : "no"),
  position: (x) => (x === 1 ? "long" : x === -1 ? "short" : x === 0 ? "flat" : "n/a"),
  time: (ms) => (typeof ms === "number" ? new Date(ms).toISOString().replace("T", " ").replace(/:00\.000Z$|\.000Z$/, "Z") : "n/a"),
};

// data-field -> formatter of the status value at that path (missing keys render "n/a").
const STATUS_FIELDS = {
  "equity": fmt.money, "initial_cash": fmt.money, "profit_quote": fmt.signed, "pnl_pct": fmt.pct,
  "pnl_today_quote": fmt.signed, "pnl_7d_quote": fmt.signed,
  "buy_hold.equity": fmt.money, "buy_hold.profit_quote": fmt.signed, "buy_hold.pct": fmt.pct,
  "position": fmt.position, "qty_base": fmt.qty, "entry_price": fmt.price, "unrealised_pnl_quote": fmt.signed,
  "n_trades": fmt.int, "fees_quote": fmt.money, "cash_quote": fmt.money,
  "last_decision.ts": fmt.text, "last_decision.status": fmt.text, "last_decision.action": fmt.text,
  "last_decision.probs.hold": fmt.prob, "last_decision.probs.buy": fmt.prob, "last_decision.probs.sell": fmt.prob,
  "last_candle.close": fmt.price, "last_candle.ts": fmt.text,
  "halt.halted": fmt.yesno, "halt.reason": fmt.text,
  "broker.breaker.state": fmt.text, "broker.breaker.trips": fmt.int, "orders.pending_count": fmt.int,
  "mode": fmt.text, "position_mode": fmt.text, "model.version": fmt.text, "model.objective": fmt.text,
  "model.decide_every": fmt.int, "rhythm.k": fmt.int, "rhythm.macro_updates": fmt.int,
  "updates.learned": fmt.int, "updates.rejected": fmt.int, "learning_guard.rolled_back": fmt.int,
};

function getPath(obj, path) {
  let cur = obj;
  for (const key of path.split(".")) {
    if (cur === null || cur === undefined || typeof cur !== "object" || !(key in cur)) return null;
    cur = cur[key];
  }
  return cur === undefined ? null : cur;
}

function signClass(node, x) {
  node.classList.remove("pos", "neg");
  if (typeof x === "number" && x > 0) node.classList.add("pos");
  if (typeof x === "number" && x < 0) node.classList.add("neg");
}

function show(node, value, formatter, signed) {
  node.dataset.value = JSON.stringify(value === undefined ? null : value);
  node.textContent = formatter(value);
  if (signed) signClass(node, value);
}

// ---- DOM helpers (text only: nothing from the API is ever parsed as HTML) ----

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c === null || c === undefined ? "" : String(c)));
  return node;
}

function cell(value, formatter, opts) {
  const td = el("td", { class: (opts && opts.cls) || "" });
  if (opts && opts.col) td.setAttribute("data-col", opts.col);
  td.dataset.value = JSON.stringify(value === undefined ? null : value);
  td.textContent = formatter(value);
  return td;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function fillTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows);
}

// ---- API ----

async function api(path, options) {
  const res = await fetch(path, Object.assign({ cache: "no-store" }, options || {}));
  let body = null;
  try { body = await res.json(); } catch (e) { body = { error: `HTTP ${res.status}` }; }
  if (!res.ok) {
    const err = new Error(body && body.error ? body.error : `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

function showError(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message || "";
}

function markLoaded() {
  document.body.dataset.loaded = "1";
  document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || "0") + 1);
  document.getElementById("updated").textContent = "updated " + new Date().toISOString().slice(11, 19) + "Z";
}

// ---- the list of states ----

async function refreshStates() {
  const data = await api("/api/states");
  const rows = data.states.map((s) => {
    const m = s.summary || {};
    const link = el("a", { href: "/s/" + encodeURIComponent(s.id) }, s.id);
    const tr = el("tr", { "data-state-id": s.id },
      el("td", {}, link),
      cell(m.mode, fmt.text), cell(m.symbol, fmt.text), cell(m.position, fmt.position),
      cell(m.equity, fmt.money, { cls: "num" }), cell(m.profit_quote, fmt.signed, { cls: "num" }),
      cell(m.n_trades, fmt.int, { cls: "num" }), cell(m.halted, fmt.yesno), cell(m.paused, fmt.yesno),
      s.available ? cell(m.last_candle_ts, fmt.text) : el("td", { class: "wrap" }, s.error));
    return tr;
  });
  fillTable("states-table", rows);
  document.getElementById("states-empty").hidden = rows.length > 0;
}

// ---- one state ----

function renderStatus(s, commands) {
  const derived = Object.assign({}, s, {
    orders: Object.assign({}, s.orders, { pending_count: s.orders && s.orders.pending ? s.orders.pending.length : null }),
  });
  for (const node of document.querySelectorAll("#state-view [data-field]")) {
    const path = node.dataset.field;
    if (path === "paused") continue;
    const formatter = STATUS_FIELDS[path] || fmt.text;
    show(node, getPath(derived, path), formatter, formatter === fmt.signed || formatter === fmt.pct);
  }
  document.getElementById("title").textContent = `${s.symbol || "?"} · ${s.mode || "?"}`;
  const halt = document.getElementById("badge-halt");
  halt.hidden = false;
  halt.textContent = s.halt && s.halt.halted ? "HALTED" : "trading";
  halt.className = "badge" + (s.halt && s.halt.halted ? " bad" : "");
  const breaker = getPath(s, "broker.breaker.state");
  const b = document.getElementById("badge-breaker");
  b.hidden = !breaker || breaker === "closed";
  b.textContent = "breaker " + (breaker || "");
  b.className = "badge bad";
  // `ritmo status` reports the daemon's paused flag; the command list carries it too (older status output).
  const paused = s.paused || commands.paused;
  const isPaused = Boolean(paused && paused.paused);
  show(document.getElementById("paused-field"), isPaused, (x) => (x ? `yes (by ${paused.by || "?"})` : "no"));
  document.getElementById("badge-paused").hidden = !isPaused;
}

function renderDecisions(items) {
  fillTable("decisions-table", items.map((d) => {
    const probCell = (col, value) => {
      const td = cell(value, fmt.prob, { cls: "num", col });
      if (typeof value === "number") {
        const bar = el("span", { class: "bar" });
        bar.style.width = Math.round(value * 40) + "px";
        td.prepend(bar);
      }
      return td;
    };
    return el("tr", { "data-ts-ms": String(d.ts_ms) },
      cell(d.ts, fmt.text, { col: "ts" }), cell(d.status, fmt.text, { col: "status" }),
      cell(d.action, fmt.text, { col: "action" }),
      probCell("p_hold", d.p_hold), probCell("p_buy", d.p_buy), probCell("p_sell", d.p_sell),
      cell(d.position_after, fmt.position, { col: "position_after" }),
      cell(d.close, fmt.price, { cls: "num", col: "close" }),
      cell(d.equity_after, fmt.money, { cls: "num", col: "equity_after" }),
      cell(d.reason, fmt.text, { col: "reason" }));
  }));
}

function renderTrades(data) {
  fillTable("trades-table", data.items.map((t) => el("tr", { "data-fill-id": String(t.id) },
    cell(t.decision_ts, fmt.text), cell(t.side, fmt.text), cell(t.qty_base, fmt.qty, { cls: "num" }),
    cell(t.price, fmt.price, { cls: "num" }), cell(t.notional_quote, fmt.money, { cls: "num" }),
    cell(t.fee_quote, fmt.money, { cls: "num" }), cell(t.position_after, fmt.position),
    cell(t.client_order_id, fmt.text))));
  document.getElementById("trades-note").textContent = data.next ? `(newest ${data.count})` : `(${data.count})`;
}

function renderCommands(data) {
  fillTable("commands-table", data.items.map((c) => el("tr", { "data-command-id": String(c.id), "data-status": c.status },
    cell(c.id, fmt.int), cell(c.kind, fmt.text), cell(c.requested_by, fmt.text), cell(c.requested_at, fmt.text),
    cell(c.status, fmt.text, { col: "status" }), cell(c.applied_at, fmt.text), cell(c.candle_ts_ms, fmt.time),
    el("td", { class: "wrap" }, c.result && Object.keys(c.result).length ? JSON.stringify(c.result) : ""))));
}

function renderLearning(data) {
  const items = data.items.slice().reverse(); // oldest first for the chart
  const useLoss = items.some((u) => typeof u.loss === "number");
  const key = useLoss ? "loss" : "entropy_after";
  drawLearning(document.getElementById("learning-chart"), items, key);
  fillTable("learning-table", data.items.slice(0, 12).map((u) => el("tr", { "data-k": String(u.k) },
    cell(u.k, fmt.int), cell(u.status, fmt.text), cell(u.parts, fmt.text),
    cell(u.loss, (x) => fixed(x, 5), { cls: "num" }), cell(u.entropy_after, (x) => fixed(x, 4), { cls: "num" }),
    cell(u.trade_prob_after, (x) => fixed(x, 4), { cls: "num" }), cell(u.method, fmt.text),
    el("td", { class: "wrap" }, u.reason || ""))));
}

function detailText(detail) {
  return detail && typeof detail === "object" ? JSON.stringify(detail) : String(detail || "");
}

function clip(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

function renderEvents(data) {
  fillTable("events-table", data.items.map((e) => el("tr", { "data-event-id": String(e.id) },
    cell(e.at, fmt.text), cell(e.kind, fmt.text), cell(e.candle_ts_ms, fmt.time),
    el("td", { class: "wrap", title: detailText(e.detail) }, clip(detailText(e.detail), 160)))));
}

// ---- charts ----

function scale(d0, d1, r0, r1) {
  const span = d1 - d0 || 1;
  return (v) => r0 + ((v - d0) / span) * (r1 - r0);
}

function axes(node, box, yMin, yMax, yFmt, xLabels) {
  for (let i = 0; i <= 4; i++) {
    const v = yMin + ((yMax - yMin) * i) / 4;
    const y = box.bottom - ((box.bottom - box.top) * i) / 4;
    node.append(svg("line", { class: "grid-line", x1: box.left, x2: box.right, y1: y, y2: y }));
    node.append(svg("text", { x: box.left - 6, y: y + 4, "text-anchor": "end" }, yFmt(v)));
  }
  node.append(svg("text", { x: box.left, y: box.bottom + 18 }, xLabels[0]));
  node.append(svg("text", { x: box.right, y: box.bottom + 18, "text-anchor": "end" }, xLabels[1]));
}

function drawEquity(node, curve) {
  node.replaceChildren();
  const pts = curve.points;
  node.dataset.points = String(pts.length);
  if (pts.length < 2) {
    node.append(svg("text", { x: 450, y: 140, "text-anchor": "middle" }, "not enough ticks yet"));
    return;
  }
  const box = { left: 80, right: 880, top: 28, bottom: 250 };
  const values = pts.flatMap((p) => [p.equity, p.buy_hold]).filter((v) => typeof v === "number");
  const yMin = Math.min(...values), yMax = Math.max(...values);
  const x = scale(pts[0].ts_ms, pts[pts.length - 1].ts_ms, box.left, box.right);
  const y = scale(yMin, yMax, box.bottom, box.top);
  axes(node, box, yMin, yMax, (v) => fixed(v, 0), [fmt.time(pts[0].ts_ms), fmt.time(pts[pts.length - 1].ts_ms)]);
  for (const key of ["buy_hold", "equity"]) {
    const coords = pts.filter((p) => typeof p[key] === "number").map((p) => `${x(p.ts_ms).toFixed(1)},${y(p[key]).toFixed(1)}`);
    node.append(svg("polyline", { class: `series-${key}`, points: coords.join(" "), "data-series": key }));
  }
  const last = pts[pts.length - 1];
  node.append(svg("rect", { class: "legend-equity", x: box.left, y: 8, width: 12, height: 4 }));
  node.append(svg("text", { x: box.left + 16, y: 14 }, `ritmo ${fixed(last.equity, 2)}`));
  node.append(svg("rect", { class: "legend-buy_hold", x: box.left + 200, y: 8, width: 12, height: 4 }));
  node.append(svg("text", { x: box.left + 216, y: 14 }, `buy & hold ${fixed(last.buy_hold, 2)}`));
}

function drawLearning(node, items, key) {
  node.replaceChildren();
  const pts = items.filter((u) => typeof u[key] === "number");
  node.dataset.points = String(pts.length);
  if (pts.length === 0) {
    node.append(svg("text", { x: 450, y: 110, "text-anchor": "middle" }, "no online update yet"));
    return;
  }
  const box = { left: 80, right: 880, top: 28, bottom: 190 };
  const ys = pts.map((u) => u[key]);
  const yMin = Math.min(...ys), yMax = Math.max(...ys);
  const x = scale(pts[0].k, pts[pts.length - 1].k, box.left, box.right);
  const y = scale(yMin, yMax, box.bottom, box.top);
  axes(node, box, yMin, yMax, (v) => v.toPrecision(3), [`k ${pts[0].k}`, `k ${pts[pts.length - 1].k}`]);
  node.append(svg("polyline", { class: "series-loss", points: pts.map((u) => `${x(u.k).toFixed(1)},${y(u[key]).toFixed(1)}`).join(" ") }));
  for (const u of pts) {
    const cls = u.status !== "learned" ? `dot-${u.status}` : u.macro ? "dot-macro" : "dot";
    node.append(svg("circle", { class: cls, cx: x(u.k).toFixed(1), cy: y(u[key]).toFixed(1), r: u.macro ? 4 : 2.5, "data-k": u.k }));
  }
  node.append(svg("text", { x: box.left, y: 14 }, key === "loss" ? "loss by update k" : "entropy after each update, by k"));
  node.append(svg("circle", { class: "legend-macro", cx: box.left + 230, cy: 10, r: 4 }));
  node.append(svg("text", { x: box.left + 240, y: 14 }, "macro update"));
  node.append(svg("circle", { class: "legend-bad", cx: box.left + 350, cy: 10, r: 3 }));
  node.append(svg("text", { x: box.left + 360, y: 14 }, "rolled back / rejected"));
}

// ---- control ----

function token() {
  const input = document.getElementById("token");
  const value = input.value.trim() || sessionStorage.getItem(TOKEN_KEY) || "";
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  return value;
}

async function sendCommand(stateId, kind) {
  const message = document.getElementById("command-message");
  if (kind === "flatten" && !window.confirm("Flatten the position at the next candle?")) return;
  const t = token();
  if (!t) {
    message.textContent = "enter the API token (RITMO_API_TOKEN) first";
    return;
  }
  try {
    const row = await api(`/api/${encodeURIComponent(stateId)}/commands`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + t, "X-Ritmo-User": "dashboard" },
      body: JSON.stringify({ kind }),
    });
    message.textContent = `${row.kind} queued as #${row.id}: the daemon applies it at its next tick`;
    message.dataset.commandId = String(row.id);
  } catch (err) {
    if (err.status === 401) sessionStorage.removeItem(TOKEN_KEY);
    message.textContent = `${kind} refused: ${err.message}`;
  }
  refreshState(stateId);
}

// ---- refresh loop ----

let busy = false;

async function refreshState(stateId) {
  if (busy) return;
  busy = true;
  const base = `/api/${encodeURIComponent(stateId)}`;
  try {
    const [status, commands, equity, decisions, trades, learning, events] = await Promise.all([
      api(`${base}/status`), api(`${base}/commands?limit=20`), api(`${base}/equity?max_points=800`),
      api(`${base}/decisions?decided=1&limit=20`), api(`${base}/trades?limit=50`),
      api(`${base}/learning?limit=500`), api(`${base}/events?limit=15`),
    ]);
    renderStatus(status, commands);
    renderCommands(commands);
    drawEquity(document.getElementById("equity-chart"), equity);
    renderDecisions(decisions.items);
    renderTrades(trades);
    renderLearning(learning);
    renderEvents(events);
    showError("");
    markLoaded();
  } catch (err) {
    showError(err.message);
  } finally {
    busy = false;
  }
}

function start() {
  const match = window.location.pathname.match(/^\/s\/([^/]+)\/?$/);
  if (!match) {
    document.getElementById("states-view").hidden = false;
    document.getElementById("title").textContent = "states";
    const tick = () => refreshStates().then(() => { showError(""); markLoaded(); }, (err) => showError(err.message));
    tick();
    setInterval(tick, REFRESH_MS);
    return;
  }
  const stateId = decodeURIComponent(match[1]);
  document.getElementById("state-view").hidden = false;
  document.title = `ritmo · ${stateId}`;
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) document.getElementById("token").value = saved;
  for (const button of document.querySelectorAll("button[data-command]")) {
    button.addEventListener("click", () => sendCommand(stateId, button.dataset.command));
  }
  document.getElementById("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    document.getElementById("token").value = "";
  });
  refreshState(stateId);
  setInterval(() => refreshState(stateId), REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
