// The broker's admin console (docs/admin.md): a page polling the admin JSON
// API under /api every two seconds.  No framework, no build step: the
// Content-Security-Policy allows this origin's scripts only.  The admin
// token lives in sessionStorage and travels as an Authorization header,
// never as a cookie.  Every value from the broker is written with
// textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
const PAGE = 50;
const TOKEN_KEY = "brokerAdminToken";
const COLORS = ["#1f6feb", "#e36209", "#1a7f37", "#8250df", "#cf222e", "#0598bc", "#bf8700"];

const $ = (id) => document.getElementById(id);
const state = {
  tab: "overview", hub: null, connOffset: 0, connection: null, group: null,
  fleet: null, app: null, pgroup: null, timer: null,
};

// -- the API -----------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  const headers = Object.assign({Authorization: "Bearer " + token}, options.headers || {});
  const response = await fetch("/api/" + path, Object.assign({}, options, {headers, cache: "no-store"}));
  if (response.status === 401) throw new Unauthorized("the admin token was refused");
  const body = await response.text();
  const data = body ? JSON.parse(body) : null;
  if (!response.ok) {
    const e = new Error((data && data.error && data.error.message) || response.statusText);
    e.status = response.status;
    throw e;
  }
  return data;
}

const enc = encodeURIComponent;
const query = (params) => Object.entries(params).filter(([, v]) => v !== "" && v != null)
  .map(([k, v]) => enc(k) + "=" + enc(v)).join("&");

// -- small DOM helpers ------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = dv;
    else node[k] = v;
  }
  for (const c of children) if (c != null) node.append(c instanceof Node ? c : String(c));
  return node;
}

const fmt = (n) => (n == null ? "–" : typeof n === "number"
  ? n.toLocaleString("en-US", {maximumFractionDigits: 1}) : String(n));

function fmtTime(seconds) {
  if (seconds == null) return "–";
  return new Date(seconds * 1000).toLocaleTimeString();
}

function fmtDuration(s) {
  if (s == null) return "–";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}

// table(el, columns, rows): columns [{title, get, num, mono}], rows' onclick via rowProps.
function table(node, columns, rows, rowProps = () => ({})) {
  node.replaceChildren(
    el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", {class: c.num ? "num" : ""}, c.title)))),
    el("tbody", {}, ...(rows.length ? rows.map((r) => el("tr", rowProps(r), ...columns.map((c) => {
      const v = c.get(r);
      return el("td", {class: (c.num ? "num " : "") + (c.mono ? "mono" : "")}, v instanceof Node ? v : fmt(v));
    }))) : [el("tr", {}, el("td", {colSpan: columns.length, class: "muted"}, "nothing here"))])));
}

function kv(pairs) {
  return el("div", {class: "kv"}, ...pairs.flatMap(([k, v]) => [el("span", {}, k), el("span", {}, fmt(v))]));
}

function dl(node, pairs) {
  node.replaceChildren(...pairs.flatMap(([k, v, mono]) => [el("dt", {}, k), el("dd", {class: mono ? "mono" : ""}, fmt(v))]));
}

// -- charts: lines on a canvas, drawn by hand -----------------------------------

function chart(canvasId, legendId, rates, names, labels) {
  const canvas = $(canvasId);
  if (!canvas || !rates) return;
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.width, height = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(width * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const series = names.map((n) => rates.series[n] || []);
  const t = rates.t;
  let max = 0;
  for (const s of series) for (const v of s) if (v != null && v > max) max = v;
  max = niceMax(max);
  const left = 46, right = 8, top = 8, bottom = 20;
  const w = width - left - right, h = height - top - bottom;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#657085";
  ctx.strokeStyle = "#e2e6ee";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + h - (h * i) / 4;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(left + w, y); ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(short(max * i / 4), left - 6, y + 4);
  }
  if (t.length > 1) {
    const t0 = t[0], span = Math.max(t[t.length - 1] - t0, 1);
    ctx.textAlign = "left";
    ctx.fillText(Math.round(span / 60) >= 1 ? "−" + Math.round(span / 60) + " min" : "−" + Math.round(span) + " s", left, height - 4);
    ctx.textAlign = "right";
    ctx.fillText("now", left + w, height - 4);
    series.forEach((s, i) => {
      ctx.strokeStyle = COLORS[i % COLORS.length];
      ctx.lineWidth = 1.8;
      ctx.beginPath();
      let pen = false;
      s.forEach((v, j) => {
        if (v == null) { pen = false; return; }
        const x = left + (w * (t[j] - t0)) / span, y = top + h - (h * v) / max;
        if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        pen = true;
      });
      ctx.stroke();
    });
  } else {
    ctx.textAlign = "center";
    ctx.fillText("collecting samples…", left + w / 2, top + h / 2);
  }
  $(legendId).replaceChildren(...names.map((n, i) => {
    const s = rates.series[n] || [];
    const last = s.length ? s[s.length - 1] : null;
    const sw = el("i");
    sw.style.background = COLORS[i % COLORS.length];
    return el("span", {}, sw, (labels ? labels[i] : n) + " " + fmt(last));
  }));
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function short(v) {
  if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (v >= 1e3) return (v / 1e3).toFixed(1) + "k";
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}

// -- views -----------------------------------------------------------------

const FACE_TITLES = {webpubsub: "Web PubSub", iot: "IoT", peergroups: "Peer groups", ecdn: "eCDN"};

async function showOverview() {
  const [o, rates] = await Promise.all([api("overview"), api("rates")]);
  renderHeader(o);
  const core = o.core, cards = [];
  cards.push(el("div", {class: "card face", id: "face-core"},
    el("h3", {}, "All hubs", el("span", {class: "muted"}, fmt(core.hubCount) + " hubs")),
    el("div", {class: "big", id: "total-connections"}, fmt(core.connections)),
    el("div", {class: "muted"}, "open connections"),
    kv([["users", core.users], ["groups", core.groups], ["messages in", core.messagesIn],
        ["messages out", core.messagesOut], ["accepted", core.connectionsAccepted],
        ["rejected", core.connectionsRejected], ["slow consumers dropped", core.slowConsumerDrops],
        ["fan-out pending", core.fanoutPending]])));
  const f = o.faces;
  if (f.webpubsub) cards.push(faceCard("webpubsub", f.webpubsub.connections, "connections", [
    ["hubs", f.webpubsub.hubs], ["users", f.webpubsub.users], ["groups", f.webpubsub.groups],
    ["REST requests", f.webpubsub.restRequests], ["REST errors", f.webpubsub.restErrors]]));
  if (f.iot) cards.push(faceCard("iot", f.iot.devicesOnline, "devices online", [
    ["fleets", f.iot.fleets], ["centrals online", f.iot.centralsOnline],
    ["telemetry accepted", f.iot.telemetryAccepted], ["messages queued", f.iot.messagesQueued],
    ["messages acked", f.iot.messagesAcked], ["auth failures", f.iot.authFailures]]));
  if (f.peergroups) cards.push(faceCard("peergroups", f.peergroups.membersOnline, "members online", [
    ["applications", f.peergroups.applications], ["groups", f.peergroups.groups],
    ["sessions", f.peergroups.sessions], ["requests", f.peergroups.requests],
    ["data messages", f.peergroups.dataMessages]]));
  if (f.ecdn) cards.push(faceCard("ecdn", f.ecdn.requests, "answers", [
    ["policy", f.ecdn.policy], ...Object.entries(f.ecdn.results).sort()]));
  $("faces").replaceChildren(...cards);
  chartsOverview(rates);
}

function faceCard(face, big, what, pairs) {
  return el("div", {class: "card face", id: "face-" + face},
    el("h3", {}, FACE_TITLES[face] || face),
    el("div", {class: "big", id: face + "-big"}, fmt(big)),
    el("div", {class: "muted"}, what), kv(pairs));
}

function chartsOverview(rates) {
  chart("chart-messages", "legend-messages", rates, ["messagesIn", "messagesOut", "iot.telemetry"],
        ["in", "out", "IoT telemetry"]);
  chart("chart-connections", "legend-connections", rates, ["connections", "users", "groups"]);
  const http = ["webpubsub.restRequests", "peergroups.requests"].concat(
    Object.keys(rates.series).filter((n) => n.startsWith("ecdn.")));
  chart("chart-http", "legend-http", rates, http,
        http.map((n) => n.replace("webpubsub.restRequests", "Web PubSub REST").replace("peergroups.requests", "peer groups")));
  const ecdn = Object.keys(rates.series).filter((n) => n.startsWith("ecdn.")).sort();
  chart("chart-ecdn", "legend-ecdn", rates, ecdn, ecdn.map((n) => n.slice(5)));
}

function renderHeader(o) {
  const health = $("health");
  const h = o.health;
  health.textContent = h.draining ? "draining" : h.ok ? (h.notes.length ? "warnings" : "healthy") : "unhealthy";
  health.className = "pill " + (h.ok ? (h.notes.length ? "warn" : "ok") : "bad");
  health.title = h.notes.join("\n");
  $("node").textContent = (o.node.id ? "node " + o.node.id + " · " : "") + "pid " + o.node.pid +
    " · up " + fmtDuration(o.node.uptime);
}

// Hubs, connections, groups, users.

async function showHubs() {
  const {hubs} = await api("hubs");
  table($("hubs-table"), [
    {title: "Hub", get: (h) => h.name, mono: true}, {title: "Face", get: (h) => h.face},
    {title: "Connections", get: (h) => h.connections, num: true},
    {title: "Users", get: (h) => h.users, num: true}, {title: "Groups", get: (h) => h.groups, num: true},
    {title: "Messages in", get: (h) => h.messagesIn, num: true},
    {title: "Messages out", get: (h) => h.messagesOut, num: true},
    {title: "Rejected", get: (h) => h.connectionsRejected, num: true},
  ], hubs, (h) => ({class: "click" + (h.name === state.hub ? " selected" : ""), data: {hub: h.name},
                    on: {click: () => selectHub(h.name)}}));
  if (!state.hub && hubs.length) {
    const busiest = hubs.slice().sort((a, b) => b.connections - a.connections)[0];
    state.hub = busiest.name;
  }
  $("hub-detail").hidden = !state.hub;
  if (state.hub) await Promise.all([showConnections(), showGroups(), showUsers(), showConnection()]);
}

function selectHub(name) {
  Object.assign(state, {hub: name, connOffset: 0, connection: null, group: null});
  refresh();
}

async function showConnections() {
  const hub = state.hub;
  $("hub-name").textContent = hub;
  const search = $("conn-search").value.trim();
  const page = await api("hubs/" + enc(hub) + "/connections?" + query({search, offset: state.connOffset, limit: PAGE}));
  const end = Math.min(page.offset + page.items.length, page.total);
  $("conn-count").textContent = page.total ? `${page.offset + 1}–${end} of ${fmt(page.total)}` : "none";
  $("conn-prev").disabled = page.offset === 0;
  $("conn-next").disabled = end >= page.total;
  table($("conn-table"), [
    {title: "Connection", get: (c) => c.connectionId, mono: true},
    {title: "User", get: (c) => c.userId}, {title: "Groups", get: (c) => c.groups, num: true},
    {title: "Connected", get: (c) => fmtTime(c.connectedAt)},
  ], page.items, (c) => ({class: "click" + (c.connectionId === state.connection ? " selected" : ""),
                          data: {connection: c.connectionId},
                          on: {click: () => { state.connection = c.connectionId; $("conn-message").textContent = ""; refresh(); }}}));
}

async function showConnection() {
  const panel = $("conn-detail");
  if (!state.connection) { panel.hidden = true; return; }
  let c;
  try {
    c = await api("hubs/" + enc(state.hub) + "/connections/" + enc(state.connection));
  } catch (e) {
    if (e.status !== 404) throw e;
    $("conn-fields").replaceChildren(el("dt", {}, "gone"), el("dd", {}, state.connection + " is no longer connected"));
    $("conn-groups").replaceChildren();
    $("conn-close").hidden = true;
    panel.hidden = false;
    return;
  }
  panel.hidden = false;
  $("conn-close").hidden = false;
  dl($("conn-fields"), [["id", c.connectionId, true], ["user", c.userId], ["hub", c.hub], ["face", c.face],
    ["address", c.address], ["subprotocol", c.subprotocol || (c.face === "webpubsub" ? "(plain)" : "")],
    ["reliable", c.reliable == null ? null : c.reliable ? "yes" : "no"],
    ["connected", fmtTime(c.connectedAt) + " (" + fmtDuration(c.connectedFor) + ")"],
    ["messages in", c.messagesIn], ["roles", c.roles.join(", ") || "none"]]);
  $("conn-groups").replaceChildren(el("div", {class: "muted"}, c.groups.length ? "Groups:" : "In no group"),
    ...c.groups.map((g) => el("span", {class: "chip"}, g, el("button", {
      class: "small", title: "remove from " + g, textContent: "Remove",
      on: {click: () => act(() => api("hubs/" + enc(state.hub) + "/connections/" + enc(c.connectionId) +
                                      "/groups/" + enc(g), {method: "DELETE"}), "conn-message",
                            `removed from ${g}`)}}))));
}

async function act(call, messageId, done) {
  try {
    await call();
    $(messageId).textContent = done;
    $(messageId).className = "muted";
  } catch (e) {
    if (e instanceof Unauthorized) return logout(e.message);
    $(messageId).textContent = e.message;
    $(messageId).className = "error";
  }
  refresh();
}

async function showGroups() {
  const search = $("group-search").value.trim();
  const page = await api("hubs/" + enc(state.hub) + "/groups?" + query({search, limit: PAGE}));
  $("group-count").textContent = fmt(page.total) + " groups";
  table($("group-table"), [
    {title: "Group", get: (g) => g.name, mono: true}, {title: "Connections here", get: (g) => g.connections, num: true},
  ], page.items, (g) => ({class: "click" + (g.name === state.group ? " selected" : ""), data: {group: g.name},
                          on: {click: () => { state.group = g.name; $("send-result").textContent = ""; refresh(); }}}));
  $("send-form").hidden = !state.group;
  $("send-group").textContent = state.group || "";
}

async function showUsers() {
  const search = $("user-search").value.trim();
  const page = await api("hubs/" + enc(state.hub) + "/users?" + query({search, limit: PAGE}));
  $("user-count").textContent = fmt(page.total) + " users";
  table($("user-table"), [
    {title: "User", get: (u) => u.userId}, {title: "Connections", get: (u) => u.connections, num: true},
  ], page.items);
}

// IoT.

async function showIoT() {
  const {fleets} = await api("iot/fleets");
  table($("fleet-table"), [
    {title: "Fleet", get: (f) => f.name, mono: true}, {title: "Devices", get: (f) => f.devices, num: true},
    {title: "Online", get: (f) => f.devicesOnline, num: true},
  ], fleets, (f) => ({class: "click" + (f.name === state.fleet ? " selected" : ""), data: {fleet: f.name},
                      on: {click: () => { state.fleet = f.name; refresh(); }}}));
  if (!state.fleet && fleets.length) state.fleet = fleets[0].name;
  $("fleet-detail").hidden = !state.fleet;
  if (!state.fleet) return;
  $("fleet-name").textContent = state.fleet;
  const search = $("device-search").value.trim();
  const page = await api("iot/fleets/" + enc(state.fleet) + "?" + query({search, limit: PAGE}));
  $("device-count").textContent = fmt(page.total) + " devices";
  table($("device-table"), [
    {title: "Device", get: (d) => el("span", {}, el("span", {class: "dot" + (d.online ? " on" : "")}), d.id)},
    {title: "Online", get: (d) => (d.online ? "yes" : "no")},
    {title: "Queue", get: (d) => d.queueDepth, num: true},
    {title: "Last value", get: (d) => (d.lastValue ? d.lastValue.payload : "–"), mono: true},
    {title: "At", get: (d) => (d.lastValue ? fmtTime(d.lastValue.received) : "–")},
    {title: "", get: (d) => el("button", {class: "small danger", textContent: "Purge", disabled: !d.queueDepth,
      data: {purge: d.id},
      on: {click: () => act(() => api("iot/fleets/" + enc(state.fleet) + "/devices/" + enc(d.id) + "/queue",
                                      {method: "DELETE"}), "device-message", `queue of ${d.id} purged`)}})},
  ], page.items);
}

// Peer groups.

async function showPeerGroups() {
  const {applications} = await api("peergroups/applications");
  table($("app-table"), [
    {title: "Application", get: (a) => a.name, mono: true}, {title: "Groups", get: (a) => a.groups, num: true},
    {title: "Members online", get: (a) => a.membersOnline, num: true},
  ], applications, (a) => ({class: "click" + (a.name === state.app ? " selected" : ""),
                            on: {click: () => { state.app = a.name; state.pgroup = null; refresh(); }}}));
  if (!state.app && applications.length) state.app = applications[0].name;
  $("app-detail").hidden = !state.app;
  if (!state.app) { $("pgroup-detail").hidden = true; return; }
  $("app-name").textContent = state.app;
  const groups = await api("peergroups/applications/" + enc(state.app) + "?limit=500");
  table($("pgroup-table"), [
    {title: "Group", get: (g) => g.name, mono: true}, {title: "Members", get: (g) => g.members, num: true},
    {title: "Online", get: (g) => g.online, num: true}, {title: "Records", get: (g) => g.records, num: true},
  ], groups.items, (g) => ({class: "click" + (g.name === state.pgroup ? " selected" : ""),
                            on: {click: () => { state.pgroup = g.name; refresh(); }}}));
  $("pgroup-detail").hidden = !state.pgroup;
  if (!state.pgroup) return;
  $("pgroup-name").textContent = state.pgroup;
  const members = await api("peergroups/applications/" + enc(state.app) + "/groups/" + enc(state.pgroup) + "?limit=500");
  table($("member-table"), [
    {title: "Peer", get: (m) => el("span", {}, el("span", {class: "dot" + (m.online ? " on" : "")}), m.peerName), mono: true},
    {title: "Friendly name", get: (m) => m.friendlyName}, {title: "Address", get: (m) => m.address},
  ], members.items);
}

// eCDN and cluster.

async function showEcdn() {
  const [e, rates] = await Promise.all([api("ecdn"), api("rates")]);
  table($("ecdn-table"), [{title: "Endpoint and result", get: (r) => r[0], mono: true}, {title: "Answers", get: (r) => r[1], num: true}],
        Object.entries(e.byEndpoint));
  const names = Object.keys(rates.series).filter((n) => n.startsWith("ecdn.")).sort();
  chart("chart-ecdn2", "legend-ecdn2", rates, names, names.map((n) => n.slice(5)));
}

async function showCluster() {
  const c = await api("cluster");
  table($("node-table"), [
    {title: "Node", get: (n) => n.id || "(single node)", mono: true},
    {title: "This node", get: (n) => (n.self ? "yes" : "")},
    {title: "Health", get: (n) => (n.alive ? "alive" : "dead")},
  ], c.nodes);
  dl($("engine-fields"), [["clustered", c.clustered ? "yes" : "no"],
    ...Object.entries(c.engine || {}).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : v])]);
}

// -- the loop ------------------------------------------------------------------

const VIEWS = {overview: showOverview, hubs: showHubs, iot: showIoT, peergroups: showPeerGroups,
               ecdn: showEcdn, cluster: showCluster};

async function refresh() {
  clearTimeout(state.timer);
  try {
    if (state.tab !== "overview") renderHeader(await api("overview"));
    await VIEWS[state.tab]();
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.refreshed = String((Number(document.body.dataset.refreshed) || 0) + 1);
  } catch (e) {
    if (e instanceof Unauthorized) return logout(e.message);
    $("updated").textContent = "update failed: " + e.message;
  }
  state.timer = setTimeout(refresh, POLL_MS);
}

function showTab(tab) {
  state.tab = tab;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === tab);
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + tab;
  refresh();
}

function logout(message) {
  clearTimeout(state.timer);
  sessionStorage.removeItem(TOKEN_KEY);
  $("tabs").hidden = true;
  $("logout").hidden = true;
  for (const v of document.querySelectorAll(".view")) v.hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("health").textContent = "…";
  $("health").className = "pill";
  $("node").textContent = "";
}

async function login(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("overview");
  } catch (e) {
    return logout(e instanceof Unauthorized ? "that token was refused" : e.message);
  }
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("logout").hidden = false;
  showTab(state.tab);
}

function debounce(fn, ms) {
  let t = null;
  return () => { clearTimeout(t); t = setTimeout(fn, ms); };
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    login($("token").value.trim());
    $("token").value = "";
  });
  $("logout").addEventListener("click", () => logout(""));
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("conn-prev").addEventListener("click", () => { state.connOffset = Math.max(0, state.connOffset - PAGE); refresh(); });
  $("conn-next").addEventListener("click", () => { state.connOffset += PAGE; refresh(); });
  $("conn-search").addEventListener("input", debounce(() => { state.connOffset = 0; refresh(); }, 300));
  for (const id of ["group-search", "user-search", "device-search"]) $(id).addEventListener("input", debounce(refresh, 300));
  $("conn-close").addEventListener("click", () => {
    const id = state.connection;
    act(() => api("hubs/" + enc(state.hub) + "/connections/" + enc(id) + "/close", {method: "POST"}),
        "conn-message", `connection ${id} closed`);
  });
  $("send-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const group = state.group;
    act(() => api("hubs/" + enc(state.hub) + "/groups/" + enc(group) + "/messages",
                  {method: "POST", body: $("send-text").value, headers: {"Content-Type": "text/plain; charset=utf-8"}}),
        "send-result", `sent to ${group}`);
  });
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) login(token); else logout("");
});
