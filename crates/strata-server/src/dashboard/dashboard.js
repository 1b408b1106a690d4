// The Strata dashboard: reads this node's API every 2 s and draws the cluster, its nodes
// and volumes. Rates come from two samples of /v1/stats. No libraries.
"use strict";

const REFRESH_MS = 2000;
let previous = null; // the last /v1/stats sample
let timer = null;
let token = localStorage.getItem("strataToken") || "";

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function rate(n) { return bytes(n) + "/s"; }

function count(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + " k";
  if (n > 0 && n < 10 && !Number.isInteger(n)) return n.toFixed(1);
  return String(Math.round(n));
}

function pill(text, kind) { return el("span", { class: "pill pill-" + kind }, text); }

class Unauthorized extends Error {}

async function get(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) throw new Unauthorized();
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error((body && body.message) || path + ": HTTP " + r.status);
  return body;
}

// Each part may fail on its own (no metadata leader: /v1/cluster fails, the rest answers).
async function load() {
  const parts = ["/v1/node", "/v1/cluster", "/v1/volumes", "/v1/stats"].map(get);
  const settled = await Promise.allSettled(parts);
  if (settled.some((s) => s.status === "rejected" && s.reason instanceof Unauthorized)) {
    throw new Unauthorized();
  }
  const [node, cluster, volumes, stats] = settled.map((s) =>
    s.status === "fulfilled" ? s.value : { error: s.reason.message || String(s.reason) });
  return { node, cluster, volumes, stats };
}

function rates(stats) {
  const out = new Map();
  if (previous && !previous.error && !stats.error) {
    const dt = (stats.unix_ms - previous.unix_ms) / 1000;
    const before = new Map(previous.volumes.map((v) => [v.volume, v]));
    for (const v of stats.volumes) {
      const p = before.get(v.volume);
      if (!p || dt <= 0) continue;
      const d = (k) => Math.max(0, v[k] - p[k]) / dt;
      out.set(v.volume, {
        read_bytes: d("read_bytes"), read_ops: d("read_ops"),
        write_bytes: d("write_bytes"), write_ops: d("write_ops"), flushes: d("flushes"),
      });
    }
  }
  return out;
}

function drawCards(d, io) {
  const { node, cluster, volumes, stats } = d;
  if (!node.error) {
    $("node-name").textContent = "· node " + node.meta.id + " · " + node.version;
  }
  let health = ["unknown", "no data"];
  if (cluster.error) {
    health = ["bad", "no metadata leader"];
    $("c-leader").textContent = "none";
    $("c-term").textContent = cluster.error;
  } else {
    const c = cluster.cluster;
    const up = c.members.filter((m) => m.session && m.session.up).length;
    const down = c.members.length - up;
    $("c-leader").textContent = "node " + c.leader;
    $("c-term").textContent = "term " + c.term + " · commit index " + c.applied;
    $("c-nodes").textContent = up + " up";
    $("c-nodes-down").textContent = down ? down + " down" : "none down";
    health = down ? ["warn", down + " node" + (down > 1 ? "s" : "") + " down"] : ["ok", "healthy"];
  }
  if (!volumes.error) {
    const comps = volumes.flatMap((v) => v.components || []);
    const notActive = comps.filter((c) => c.state !== "active").length;
    $("c-volumes").textContent = String(volumes.length);
    $("c-components").textContent = comps.length
      ? comps.length + " copies, " + (notActive ? notActive + " not active" : "all active")
      : "no replicated volumes";
    if (notActive && health[0] === "ok") health = ["warn", notActive + " copies not active"];
  }
  if (!stats.error) {
    const s = stats.store;
    $("c-store").textContent = bytes(s.live_bytes) + " live";
    $("c-store-detail").textContent = bytes(s.log_bytes) + " log (" + s.segments +
      (s.segments === 1 ? " segment, " : " segments, ") + bytes(s.dead_bytes) +
      " not live) · " + bytes(s.free_bytes) + " free";
    // The node's disk: writes get ENOSPC once only the reserve is left.
    if (s.full) {
      health = ["bad", "disk full: writes refused"];
      $("c-store-detail").textContent += " · FULL: writes get ENOSPC (" +
        bytes(s.reserve_bytes) + " reserved); delete or trim to free space";
    } else if (s.nearly_full) {
      if (health[0] === "ok") health = ["warn", "disk nearly full"];
      $("c-store-detail").textContent += " · nearly full (writes stop at " +
        bytes(s.reserve_bytes) + " free)";
    }
  }
  let r = 0, w = 0, ops = 0;
  for (const v of io.values()) { r += v.read_bytes; w += v.write_bytes; ops += v.read_ops + v.write_ops; }
  $("c-io").textContent = previous ? rate(r + w) : "…";
  $("c-io-detail").textContent = "read " + rate(r) + " · write " + rate(w) + " · " +
    count(ops) + " IOPS";
  const h = $("health");
  h.className = "pill pill-" + health[0];
  h.textContent = health[1];
}

function drawNodes(cluster) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren();
  if (cluster.error) {
    body.append(el("tr", {}, el("td", { colSpan: 6, class: "muted" }, cluster.error)));
    return;
  }
  for (const m of cluster.cluster.members) {
    const rec = m.record || {};
    const up = m.session && m.session.up;
    const state = m.session ? (up ? pill("up", "ok") : pill("down", "bad")) : pill("not registered", "warn");
    const leader = m.id === cluster.cluster.leader ? " (leader)" : "";
    body.append(el("tr", { "data-node": String(m.id) },
      el("td", {}, "node " + m.id + leader),
      el("td", {}, state),
      el("td", {}, m.role),
      el("td", {}, el("span", {}, "rpc " + m.rpc),
        el("span", { class: "sub" }, "nbd " + (rec.nbd || "?") + " · http " + (rec.http || "?"))),
      el("td", {}, (rec.site || "–") + " / " + (rec.rack || "–")),
      el("td", { class: "num" }, m.session ? String(m.session.incarnation) : "–")));
  }
}

// A copy's resynced bytes at the previous refresh, by "volume/node", for its rate.
let resyncSeen = new Map();

function duration(seconds) {
  if (seconds < 60) return Math.ceil(seconds) + " s";
  if (seconds < 3600) return Math.ceil(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function copies(v, now, seen) {
  if (!v.components || v.components.length === 0) return el("span", { class: "muted" }, "one");
  const box = el("div", { class: "copies" });
  for (const c of v.components) {
    const kind = c.state === "active" ? "ok" : c.state === "resyncing" ? "warn" : "bad";
    const row = el("div", { class: "copy", "data-component": c.node + ":" + c.state },
      el("span", {}, "node " + c.node), pill(c.state, kind));
    const left = c.dirty_bytes || 0;
    const done = c.resynced_bytes || 0;
    const key = v.name + "/" + c.node;
    const before = resyncSeen.get(key);
    seen.set(key, { done, t: now });
    const speed = before && now > before.t ? Math.max(0, done - before.done) / ((now - before.t) / 1000) : 0;
    if (left > 0) {
      const pct = Math.floor((100 * done) / (done + left));
      const bar = el("span", { class: "bar", title: pct + "% resynced" }, el("span"));
      bar.firstChild.style.width = pct + "%";
      const eta = speed > 0 ? " · " + rate(speed) + " · " + duration(left / speed) + " to go" : "";
      row.append(bar, el("span", { class: "muted small" }, bytes(left) + " left" + eta));
    } else if (c.scan_left_bytes) {
      row.append(el("span", { class: "muted small" }, "scan: " + bytes(c.scan_left_bytes) + " left"));
    } else if (done > 0) {
      row.append(el("span", { class: "muted small" }, bytes(done) + " resynced"));
    }
    box.append(row);
  }
  return box;
}

function drawVolumes(volumes, stats, io, me) {
  const body = $("volumes").tBodies[0];
  body.replaceChildren();
  if (volumes.error) {
    body.append(el("tr", {}, el("td", { colSpan: 8, class: "muted" }, volumes.error)));
    return;
  }
  $("no-volumes").hidden = volumes.length > 0;
  const totals = new Map((stats.error ? [] : stats.volumes).map((v) => [v.volume, v]));
  const now = Date.now();
  const seen = new Map();
  for (const v of volumes) {
    const t = totals.get(v.name);
    const r = io.get(v.name);
    // Usage is known where a volume of one copy lives; a replicated volume's is not shown.
    const here = v.replicas === 1 && v.node === me;
    const snaps = v.snapshots.length
      ? el("span", {}, here ? bytes(v.snapshot_exclusive_bytes) : "–",
        el("span", { class: "sub" }, v.snapshots.length + " snapshot" + (v.snapshots.length > 1 ? "s" : "")))
      : el("span", { class: "muted" }, "none");
    const ioCell = (kind) => el("td", { class: "num io-" + kind },
      el("span", { class: "io-rate" }, r ? rate(r[kind + "_bytes"]) : "–"),
      el("span", { class: "sub io-total" }, t ? bytes(t[kind + "_bytes"]) + " · " +
        count(t[kind + "_ops"]) + " ops" : "no I/O here"));
    body.append(el("tr", { "data-volume": v.name },
      el("td", {}, el("span", { class: "name" }, v.name),
        el("span", { class: "sub" }, v.origin ? "clone of " + v.origin : v.export_uri)),
      el("td", { class: "num" }, bytes(v.size_bytes)),
      el("td", { class: "num", title: here ? "" : "known on node " + v.node },
        here ? bytes(v.allocated_bytes) : "–"),
      el("td", { class: "num" }, snaps),
      el("td", {}, "node " + v.node,
        el("span", { class: "sub" }, [
          v.replicas > 1 ? "owner · epoch " + v.epoch : "",
          v.connections ? v.connections + " connected" : "",
        ].filter((x) => x).join(" · "))),
      ioCell("read"),
      ioCell("write"),
      el("td", {}, copies(v, now, seen))));
  }
  resyncSeen = seen;
}

async function refresh() {
  try {
    const d = await load();
    $("token-form").hidden = true;
    const io = d.stats.error ? new Map() : rates(d.stats);
    drawCards(d, io);
    drawNodes(d.cluster);
    drawVolumes(d.volumes, d.stats, io, d.node.error ? null : d.node.meta.id);
    if (!d.stats.error) previous = d.stats;
    const errors = [d.node, d.volumes, d.stats].filter((x) => x.error).map((x) => x.error);
    $("problem").hidden = errors.length === 0;
    $("problem").textContent = errors.join("; ");
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e instanceof Unauthorized) {
      $("token-form").hidden = false;
      $("health").className = "pill pill-warn";
      $("health").textContent = "token needed";
    } else {
      $("problem").hidden = false;
      $("problem").textContent = "cannot reach this node: " + e.message;
      const h = $("health");
      h.className = "pill pill-bad";
      h.textContent = "unreachable";
    }
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").querySelector("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    localStorage.setItem("strataToken", token);
    previous = null;
    clearTimeout(timer);
    refresh();
  });
  refresh();
});
