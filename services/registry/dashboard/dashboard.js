// Renders /api/dashboard. No framework: text goes in with textContent, charts are inline SVG.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function short(sha) { return sha ? sha.slice(0, 12) : "—"; }
function num(x, digits) { return x === null || x === undefined ? "—" : Number(x).toFixed(digits); }
function when(ts) { return ts ? ts.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC") : "—"; }

function fillTable(section, rows, cells) {
  const body = document.querySelector(`#${section} tbody`);
  body.replaceChildren();
  for (const row of rows) {
    const tr = el("tr");
    for (const cell of cells(row)) {
      const td = el("td");
      if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell === null || cell === undefined ? "—" : String(cell);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
  document.querySelector(`#${section} .empty`).hidden = rows.length > 0;
}

// how many replicas of each side a soak ran, and the energy service's advice it was sized to
function replicas(v) {
  const planned = v.totals.replicas ?? "?";
  if (!v.sized_by) return planned;
  const cell = el("span", `${planned} (advice: ${v.sized_by.validator_replicas})`);
  cell.title = `sized to scaling.recommended ${v.sized_by.event_id}`;
  return cell;
}

function code(text, title) { const c = el("code", text); if (title) c.title = title; return c; }

// One run's curve: the loss of an MNTP run, the mean reward of an RL run (with its KL and answer variety).
function lossCurve(run) {
  const rewards = run.reward_curve || [];
  const rl = rewards.length > 0;
  const points = rl ? rewards.map(p => ({ step: p.step, y: p.reward_mean }))
    : (run.loss_curve || []).map(p => ({ step: p.step, y: p.loss }));
  const fig = el("figure");
  fig.dataset.job = run.job_id;
  const last = rl ? rewards[rewards.length - 1] : null;
  const tail = rl
    ? `reward ${num(rewards[0].reward_mean, 3)} → ${num(last.reward_mean, 3)} ± ${num(last.reward_spread, 3)}` +
      ` · KL ${num(last.kl, 4)} · distinct answers ${last.distinct_share === null || last.distinct_share === undefined ? "—" : Math.round(last.distinct_share * 100) + "%"}`
    : `last loss ${num(points.length ? points[points.length - 1].y : null, 3)}`;
  fig.appendChild(el("figcaption",
    `${run.cycle_id || "no cycle"} · job ${run.job_id} · ${run.status} · ${points.length} steps · ${tail}`));
  const W = 340, H = 140, L = 36, B = 18, T = 6, R = 6;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-label": `${rl ? "reward" : "loss"} curve of ${run.job_id}` });
  chart.classList.add(rl ? "reward-curve" : "loss-curve");
  if (points.length) {
    const steps = points.map(p => p.step), ys = points.map(p => p.y);
    const x0 = Math.min(...steps), x1 = Math.max(...steps), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const sx = s => L + (x1 === x0 ? 0.5 : (s - x0) / (x1 - x0)) * (W - L - R);
    const sy = y => T + (y1 === y0 ? 0.5 : (y1 - y) / (y1 - y0)) * (H - T - B);
    chart.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d1d5db" }));
    chart.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d1d5db" }));
    const path = svg("polyline", { fill: "none", stroke: rl ? "#10b981" : "#2563eb", "stroke-width": 1.5,
      points: points.map(p => `${sx(p.step).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ") });
    chart.appendChild(path);
    const label = (x, y, text, anchor) => { const t = svg("text", { x, y, "text-anchor": anchor || "start" }); t.textContent = text; chart.appendChild(t); };
    label(L - 4, T + 8, num(y1, 2), "end");
    label(L - 4, H - B, num(y0, 2), "end");
    label(L, H - 4, `step ${x0}`);
    label(W - R, H - 4, `step ${x1}`, "end");
  }
  fig.appendChild(chart);
  return fig;
}

// What the soak measured of what the adapter learned: an encoder's retrieval, a policy's reward and variety.
function learned(v) {
  const r = v.retrieval, p = v.policy;
  if (r && (r.candidate || r.baseline)) {
    const side = s => s ? `${num(s.recall_at_1, 2)} / ${num(s.mrr, 2)}` : "—";
    return el("span", `recall@1 / MRR ${side(r.candidate)} vs ${side(r.baseline)}`, "learned-retrieval");
  }
  if (p && (p.candidate || p.baseline)) {
    const c = p.candidate || {}, b = p.baseline || {};
    const text = `reward ${num(c.reward_mean, 3)} vs ${num(b.reward_mean, 3)}` + (p.collapsed ? " · collapsed" : "");
    const cell = el("span", text, p.collapsed ? "learned-collapsed" : "learned-policy");
    if (p.collapse_reason) cell.title = p.collapse_reason;
    return cell;
  }
  return "—";
}

function energyBars(rows) {
  const box = document.querySelector("#energy .bars");
  box.replaceChildren();
  const measured = rows.filter(r => r.wh !== null);
  if (!measured.length) return;
  const max = Math.max(...measured.map(r => r.wh)) || 1;
  const W = 800, row = 20, H = row * measured.length + 4, L = 170;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "energy per cycle" });
  measured.forEach((r, i) => {
    const y = 2 + i * row;
    const t = svg("text", { x: 0, y: y + 13 }); t.textContent = r.cycle_id; chart.appendChild(t);
    const train = (r.training_wh || 0) / max * (W - L - 90), valid = (r.validation_wh || 0) / max * (W - L - 90);
    chart.appendChild(svg("rect", { x: L, y: y + 2, width: Math.max(train, 0.5), height: row - 6, fill: "#2563eb" }));
    chart.appendChild(svg("rect", { x: L + train, y: y + 2, width: Math.max(valid, 0), height: row - 6, fill: "#10b981" }));
    const v = svg("text", { x: L + train + valid + 6, y: y + 13 }); v.textContent = `${num(r.wh, 3)} Wh`; chart.appendChild(v);
  });
  box.appendChild(chart);
}

function render(data) {
  fillTable("channels", data.channels, c => [
    c.channel, code(short(c.adapter_sha256), c.adapter_sha256), when(c.since),
    c.via === "rolled_back" ? "rolled back" : "promoted", c.approver || c.operator_id]);
  fillTable("approvals", data.pending_approvals, a => [
    code(a.request_id), a.kind, a.subject_id, a.requested_by, when(a.expires_at)]);
  const curves = document.querySelector("#training .curves");
  curves.replaceChildren(...data.training.filter(r => (r.loss_curve || []).length || (r.reward_curve || []).length)
    .map(lossCurve));
  document.querySelector("#training .empty").hidden = curves.children.length > 0;
  fillTable("validations", data.validations, v => [
    code(v.validation_id), code(short(v.adapter_sha256), v.adapter_sha256), v.purpose,
    el("span", v.verdict || v.status, `verdict-${v.verdict || v.status}`), num(v.score, 2),
    v.success_rate === null ? "—" : `${Math.round(v.success_rate * 100)}%`, replicas(v),
    `${v.totals.cycles_done}/${v.totals.cycles_planned ?? "?"}`, v.totals.incidents, learned(v)]);
  energyBars(data.energy_per_cycle);
  fillTable("energy", data.energy_per_cycle, e => [
    e.cycle_id, num(e.training_wh, 4), num(e.validation_wh, 4), num(e.wh, 4), num(e.gco2e, 3),
    e.unmeasured.length ? e.unmeasured.join(", ") : "—"]);
  document.getElementById("refreshed").textContent = `Updated ${new Date().toISOString().slice(11, 19)} UTC.`;
}

async function refresh() {
  try {
    const response = await fetch("/api/dashboard", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    document.body.dataset.state = "ready";
  } catch (err) {
    document.body.dataset.state = "error";
    document.getElementById("refreshed").textContent = `Could not load the registry: ${err.message}`;
  }
}

refresh();
setInterval(refresh, 10000);
