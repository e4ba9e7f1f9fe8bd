// The dashboard pages, rendered from the JSON API and refreshed by polling.
// Every value from the API becomes a text node (textContent / createTextNode), never markup.
"use strict";

const POLL_MS = 2000;
const main = document.getElementById("main");
const statusLine = document.getElementById("status");
let lastBody = null;

// el("td", {class: "mono"}, "text", childNode, ...): an element whose string children are text nodes
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

const num = (v, digits = 4) => (typeof v === "number" ? v.toFixed(digits) : "-");
const mb = (v) => (typeof v === "number" ? (v / 1e6).toFixed(2) : "-");
const kb = (v) => (typeof v === "number" ? (v / 1e3).toFixed(1) : "-");
const when = (t) => (typeof t === "number" ? new Date(t * 1000).toLocaleString() : "-");
const short = (hex, n = 16) => (hex ? String(hex).slice(0, n) : "-");
const runHref = (id) => `/runs/${encodeURIComponent(id)}`;
const roundHref = (id, n) => `${runHref(id)}/rounds/${encodeURIComponent(n)}`;

function table(head, rows, textColumns = []) {
  const t = el("table", {});
  const th = (h, i) => el("th", { class: textColumns.includes(i) ? "text" : null }, h);
  t.append(el("thead", {}, el("tr", {}, ...head.map(th))));
  const body = el("tbody", {});
  for (const row of rows) {
    body.append(el("tr", {}, ...row.map((c, i) => {
      const cell = c && typeof c === "object" && !(c instanceof Node) ? c : { value: c };
      return el("td", { class: cell.cls || (textColumns.includes(i) ? "text" : null) }, cell.value);
    })));
  }
  t.append(body);
  return t;
}

function facts(pairs) {
  const dl = el("dl", { class: "facts" });
  for (const [k, v, cls] of pairs) dl.append(el("dt", {}, k), el("dd", { class: cls }, v));
  return dl;
}

function crumbs(...parts) {
  const nav = document.getElementById("crumbs");
  nav.replaceChildren(...parts.map(([text, href]) => (href ? el("a", { href }, text) : el("span", {}, text))));
}

// ---------------------------------------------------------------- runs list
const STATE_CLASS = { finished: "evaluated", running: "accepted", stopped: "rejected" };

function runState(run) {  // "stopped": unfinished, and its coordinator has gone silent (killed, crashed)
  const text = run.state === "stopped" ? `stopped (last heard ${run.heard ? when(run.heard) : "never"})` : run.state;
  return { value: text, cls: STATE_CLASS[run.state] };
}

function renderRuns(data) {
  crumbs(["runs"]);
  const dp = data.runs.some((r) => typeof r.epsilon === "number");  // the column only once a run used DP
  const rows = data.runs.map((r) => [
    el("a", { href: runHref(r.run_id) }, r.run_id), r.model, r.method,
    `${r.rounds_done} / ${r.num_rounds ?? "?"}`, num(r.last_heldout_loss), ...(dp ? [eps(r.epsilon)] : []),
    when(r.started), runState(r),
  ]);
  const head = ["run", "model", "method", "rounds", "held-out (last)", ...(dp ? ["ε spent"] : []), "started", "state"];
  const body = rows.length
    ? table(head, rows, [0, 1, 2])
    : el("p", { class: "empty" }, "No runs in this state store yet: start one (make demo) and it appears here.");
  main.replaceChildren(el("h1", {}, "Runs"), body);
}

// ---------------------------------------------------------------- run view
// A client is its node id (c.client); its name is what it reported, so two may report the same one:
// then each label carries its node id too.
function clientLabels(clients) {
  const seen = new Map();
  for (const c of clients) seen.set(c.name, (seen.get(c.name) || 0) + 1);
  const label = (c) => (seen.get(c.name) > 1 ? `${c.name} (node ${c.node_id ?? c.client})` : c.name);
  return new Map(clients.map((c) => [c.client, label(c)]));
}

// hasOwn: a client keyed "constructor" must not read Object's
const lossOf = (round, c) => (Object.hasOwn(round.heldout, c.client) ? round.heldout[c.client] : null);

function runCharts(data) {
  const rounds = data.rounds, xs = rounds.map((r) => (r.round === 0 ? "0" : String(r.round)));
  const labels = clientLabels(data.clients);
  const heldout = [{ name: "mean", values: rounds.map((r) => r.mean_heldout_loss), emphasis: true }]
    .concat(data.clients.map((c) => ({ name: labels.get(c.client), values: rounds.map((r) => lossOf(r, c)) })));
  const trained = rounds.filter((r) => r.round > 0), txs = trained.map((r) => String(r.round));
  return el("div", { class: "charts" },
    Charts.lineChart("Held-out loss per round (0 = before training)", xs, heldout),
    Charts.barChart("MB per round, all clients", txs, [
      { name: "up", values: trained.map((r) => (r.bytes_up ?? 0) / 1e6), color: "#2f6fde" },
      { name: "down", values: trained.map((r) => (r.bytes_down ?? 0) / 1e6), color: "#e0741f" },
    ], false, (v) => v.toFixed(3)),
    Charts.barChart("Participation per round", xs, [
      { name: "accepted", values: rounds.map((r) => r.accepted), color: "#2a9d4b" },
      { name: "evaluated only", values: rounds.map((r) => r.evaluated), color: "#9aa5b1" },
      { name: "rejected", values: rounds.map((r) => r.rejected), color: "#b3261e" },
      { name: "refused release", values: rounds.map((r) => r.refused), color: "#e0741f" },
    ], true, (v) => String(Math.round(v))));
}

// ---------------------------------------------------------------- privacy (client-level DP, issue 16)
const CLIPPED_WHERE = { server: "by the coordinator, on receipt", client: "on each device, before upload" };
const pct = (v) => (typeof v === "number" ? `${(v * 100).toFixed(1)} %` : "-");
const sig = (v) => (typeof v !== "number" ? "-"  // 4 significant digits: C = 1, q = 0.05, δ = 1e-5
  : v !== 0 && Math.abs(v) < 1e-3 ? Number(v.toPrecision(4)).toExponential() : String(Number(v.toPrecision(4))));
const eps = (v) => (typeof v !== "number" ? "-" : v < 1e4 ? v.toFixed(3) : v.toPrecision(3));  // as the round table
const hasEpsilon = (r) => r.privacy && typeof r.privacy.epsilon === "number";

// The guarantee as an operator reads it, from a round's privacy facts (and the run's, for what a round lacks).
function privacyFacts(p, run) {
  return [["noise multiplier z", sig(p.noise_multiplier ?? run.noise_multiplier)],
    ["clip norm C", sig(p.clip_norm ?? run.clip_norm)], ["clipping", CLIPPED_WHERE[p.clipping ?? run.clipping] ?? "-"],
    ["sampling rate q", sig(p.sampling_rate ?? run.sampling_rate)],
    ["expected clients per round m", num(p.expected_clients, 1)]];
}

// Shown only for a run that used DP: the epsilon spent per round as a curve, the latest guarantee, per-round facts.
function privacyPanel(data) {
  const dp = data.rounds.filter((r) => r.privacy);
  if (!data.run.privacy && !dp.length) return [];
  const run = data.run.privacy || {}, latest = dp.filter(hasEpsilon).pop() ?? dp[dp.length - 1];
  const p = latest ? latest.privacy : {}, limit = run.max_epsilon > 0 ? run.max_epsilon : null;
  const trained = data.rounds.filter((r) => r.round > 0), xs = trained.map((r) => String(r.round));
  const spent = [{ name: "ε spent", values: trained.map((r) => (hasEpsilon(r) ? r.privacy.epsilon : null)),
    emphasis: true, color: "#8e44ad" }];
  if (limit !== null) spent.push({ name: "limit (dp.max-epsilon)", values: trained.map(() => limit), color: "#b3261e" });
  const clipped = trained.map((r) => (r.privacy && typeof r.privacy.clipped_fraction === "number"
    ? r.privacy.clipped_fraction * 100 : null));
  const guarantee = latest
    ? `ε = ${eps(p.epsilon)} at δ = ${sig(p.delta ?? run.delta)} after round ${latest.round}`
    : "no round released under DP yet";
  const rows = dp.map((r) => [r.round, eps(r.privacy.epsilon), pct(r.privacy.clipped_fraction),
    sig(r.privacy.noise_multiplier), sig(r.privacy.clip_norm), sig(r.privacy.sampling_rate),
    num(r.privacy.expected_clients, 1)]);
  return [el("h2", {}, "Privacy"),
    facts([["spent", guarantee], ["limit", limit === null ? "none (dp.max-epsilon not set)" : `ε ≤ ${sig(limit)}`],
      ["protects", "each device's whole dataset, from anyone who sees the released adapters (not from the "
        + "coordinator, which sees each update unless secure aggregation hides it)"],
      ...privacyFacts(p, run), ["clipped updates (latest)", pct(p.clipped_fraction)],
      ["population", run.population ?? "-"]]),
    el("div", { class: "charts" },
      Charts.lineChart("ε spent after each round (client-level DP)", xs, spent, eps),
      Charts.barChart("Updates clipped to C per round (%)", xs,
        [{ name: "clipped", values: clipped, color: "#e0741f" }], false, (v) => `${v.toFixed(1)} %`)),
    table(["round", "ε spent", "clipped", "z", "C", "q", "m"], rows)];
}

// ---------------------------------------------------------------- secure aggregation (SecAgg+, issue 17)
// A round's cell in the round table: how many devices are in the sum, how many were recovered after dropping, and
// how many of the sum were enrolled devices (shared/enrolment.py).
function secureCell(r) {
  const s = r.secure;
  if (!s) return "-";
  const recovered = s.recovered ? `, ${s.recovered} recovered` : "";
  const enrolled = s.enrolled ? `, ${s.enrolled} enrolled` : "";
  return `${s.survivors ?? "?"} in sum${recovered}${enrolled}`;
}

// The round view's facts of a secure round: who is in the sum, who fell out, the parameters.
function secureSection(s) {
  return [el("h2", {}, "Secure aggregation (SecAgg+)"), facts([
    ["what the coordinator saw", "only the sum of the masked updates, never one device's delta"],
    ["devices in the sum", String(s.survivors ?? "-")],
    ["dropped after sharing keys (masks removed)", String(s.recovered ?? "-")],
    ["out of the protocol in all", String(s.dropped ?? "-")],
    ["devices in the sum that announced an enrolled identity (then every survivor signed its survivor list)",
      String(s.enrolled ?? "-")],
    ["shares / threshold", `${s.shares ?? "-"} / ${s.threshold ?? "-"}`],
    ["clip range c (each entry in [-c, c])", sig(s.clip_range)]])];
}

function renderRun(data) {
  const run = data.run, state = runState(run);
  crumbs(["runs", "/"], [run.run_id]);
  const rows = data.rounds.map((r) => [
    el("a", { href: roundHref(run.run_id, r.round) }, r.round === 0 ? "0 (before)" : String(r.round)),
    r.closed ? "closed" : "in progress", num(r.seconds, 1), r.participants, r.accepted, r.rejected + r.refused,
    secureCell(r), num(r.mean_train_loss), num(r.mean_heldout_loss), mb(r.bytes_up), mb(r.bytes_down),
    { value: r.key_id || "-", cls: "mono" }, { value: short(r.manifest_digest), cls: "mono" },
  ]);
  const rejections = data.rejections.length
    ? table(["round", "client", "node", "what", "reason"], data.rejections.map((e) => [
      e.round, e.name, { value: e.node_id ?? "-", cls: "mono" }, { value: e.status, cls: e.status }, e.reason]), [1, 4])
    : el("p", { class: "empty" }, "No update was rejected and no device refused a release.");
  main.replaceChildren(
    el("h1", {}, `Run ${run.run_id}`),
    facts([["model", run.model], ["aggregation", run.method],
      ["rounds", `${data.rounds.filter((r) => r.round > 0 && r.closed).length} of ${run.num_rounds ?? "?"} done`],
      ["base digest", short(run.base_digest, 64), "mono"], ["started", when(run.started)],
      ["finished", run.finished ? when(run.finished) : "not yet (updates live)"],
      ["state", state.value, state.cls]]),
    runCharts(data),
    ...privacyPanel(data),
    el("h2", {}, "Rounds"),
    table(["round", "state", "seconds", "clients", "accepted", "rejected", "secure", "train loss", "held-out mean",
      "MB up", "MB down", "key id", "manifest"], rows),
    el("h2", {}, "Devices"),
    table(["client", "node", "rank", "accepted updates", "mean staleness"], data.clients.map((c) => [
      c.name, { value: c.node_id ?? "-", cls: "mono" }, c.lora_rank ?? (run.config?.["lora.rank"] ?? "run's"),
      c.accepted, num(c.mean_staleness, 2)]), [0]),
    el("h2", {}, "Rejections"), rejections);
}

// ---------------------------------------------------------------- round view
function releaseSection(release, rec) {
  if (!release) {
    return [el("p", { class: "empty" }, "This round published no signed release (the adapter stayed as it was).")];
  }
  const out = [facts([["manifest SHA-256", rec.manifest_digest, "mono"], ["key id", rec.key_id, "mono"],
    ["signed at", rec.signed_at], ["release folder", release.folder, "mono"]])];
  if (release.error) return out.concat(el("p", { class: "empty" }, release.error));
  const m = release.manifest;
  out.push(facts([["signature (Ed25519)", release.signature, "mono"],
    ["manifest digest matches the store", release.digest_matches ? "yes" : "NO: the folder holds another release"],
    ["kind / round", `${m.kind} / ${m.round}`], ["previous manifest", m.previous || "(none: first of the run)", "mono"],
    ["base digest", m.base_digest, "mono"], ["method", m.method], ["created", m.created]]));
  out.push(table(["file", "SHA-256"], Object.entries(m.files).map(([f, h]) => [f, { value: h, cls: "mono" }]), [0]));
  return out;
}

// A budget device's node config memory-budget-mb and what it chose to fit it (micro-batch, checkpointing).
function budget(c) {
  if (c.memory_budget_mb == null) return "-";
  const batch = c.micro_batch_size ? `micro-batch ${c.micro_batch_size}` : "whole batch";
  const ckpt = c.gradient_checkpointing === 1 ? ", checkpointing" : "";
  return `${c.memory_budget_mb} MB: ${batch}${ckpt}`;
}

function renderRound(data) {
  const run = data.run, rec = data.round;
  crumbs(["runs", "/"], [run.run_id, runHref(run.run_id)], [`round ${rec.round}`]);
  const rows = data.clients.map((c) => [
    c.name, { value: c.node_id ?? "-", cls: "mono" }, { value: c.status ?? "?", cls: c.status }, c.reason ?? "",
    c.num_examples ?? "-", c.lora_rank ?? (c.status === "accepted" ? data.lora_rank ?? "run's" : "-"),
    budget(c), c.staleness ?? "-", c.contributions ?? "-",
    num(c.train_loss), num(c.heldout_loss), num(c.train_seconds, 1), num(c.update_norm, 3),
    kb(c.bytes_up), kb(c.bytes_down),
  ]);
  const settings = Object.entries(data.aggregation)
    .filter(([k]) => k !== "aggregation.method").map(([k, v]) => [k, String(v)]);
  const counts = `${rec.participants} replied: ${rec.accepted} accepted, ${rec.rejected} rejected, `
    + `${rec.refused} refused the release, ${rec.evaluated} evaluated only`;
  main.replaceChildren(
    el("h1", {}, `Round ${rec.round} of run ${run.run_id}`),
    el("h2", {}, "Clients"),
    table(["client", "node", "status", "reason", "examples", "rank", "memory budget", "staleness",
      "updates so far", "train loss", "held-out", "train s", "update norm", "KB up", "KB down"], rows, [0, 3]),
    el("h2", {}, "Aggregation"),
    facts([["method", rec.method ?? run.method],
      ["state", rec.closed ? `closed after ${num(rec.seconds, 1)} s` : "in progress"], ["clients", counts],
      ["mean train loss", num(rec.mean_train_loss)], ["mean held-out loss", num(rec.mean_heldout_loss)],
      ["MB up / down", `${mb(rec.bytes_up)} / ${mb(rec.bytes_down)}`], ...settings]),
    ...(rec.privacy ? [el("h2", {}, "Privacy"), facts([
      ["ε spent after this round", `${eps(rec.privacy.epsilon)} at δ = ${sig(rec.privacy.delta)}`],
      ...privacyFacts(rec.privacy, run.privacy || {}), ["clipped updates", pct(rec.privacy.clipped_fraction)]])] : []),
    ...(rec.secure ? secureSection(rec.secure) : []),
    el("h2", {}, "Signed release"), ...releaseSection(data.release, rec));
}

// ---------------------------------------------------------------- routing and polling
function route() {
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  const run = `/api/runs/${encodeURIComponent(parts[1])}`;
  if (parts[0] === "runs" && parts.length === 2) return { api: run, render: renderRun };
  if (parts[0] === "runs" && parts[2] === "rounds" && parts.length === 4) {
    return { api: `${run}/rounds/${encodeURIComponent(parts[3])}`, render: renderRound };
  }
  return { api: "/api/runs", render: renderRuns };
}

async function refresh(view) {
  try {
    const response = await fetch(view.api, { headers: { Accept: "application/json" }, cache: "no-store" });
    const body = await response.text();
    if (!response.ok) {
      statusLine.textContent = `error ${response.status}: ${JSON.parse(body).detail ?? body}`;
      statusLine.className = "status error";
      return;
    }
    if (body !== lastBody) { // re-render only what changed: the page keeps its scroll position otherwise
      lastBody = body;
      view.render(JSON.parse(body));
    }
    statusLine.textContent = `live: updated ${new Date().toLocaleTimeString()}`;
    statusLine.className = "status";
  } catch (err) {
    statusLine.textContent = `cannot reach the dashboard (${err.message}); retrying`;
    statusLine.className = "status error";
  }
}

const view = route();
refresh(view);
setInterval(() => { if (!document.hidden) refresh(view); }, POLL_MS);
