// raytumor review page: no framework, no network beyond this server. Text from the data is only ever set
// with textContent (paths and notes may hold anything).
"use strict";

const PAGE = 100;
const S = {
  summary: null,
  sort: "score", desc: true, offset: 0,
  ids: [], rows: [], total: 0,   // all matching ids in order; the rows of the page on screen
  pos: -1,                       // index into ids of the current row
  open: false,                   // detail view shown
  detail: null,                  // {row, history} of the current row
  slice: null,                   // slice shown in the detail view (volumes)
  curve: null,                   // the current volume's per-slice scores
  drafts: {},                    // row id -> note typed but not yet saved with a verdict
  loading: 0,
};
const $ = (id) => document.getElementById(id);
const FILTERS = ["label", "view", "source", "kind", "scope", "errors", "verdict"];

function el(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, opts || {}));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

function fmtScore(v) { return v == null ? "" : v.toFixed(3); }
function verdictName(v) { return v ? (S.summary.verdicts[v] || v) : ""; }

function params(extra) {
  const p = new URLSearchParams();
  const q = $("q").value.trim();
  if (q) p.set("q", q);
  for (const k of FILTERS) { const v = $("f-" + k).value; if (v) p.set(k, v); }
  if ($("f-flagged").checked) p.set("flagged", "1");
  p.set("sort", S.sort); p.set("desc", S.desc ? "1" : "0");
  for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
  return p;
}

function saveState() {
  const p = params({ offset: S.offset });
  if (S.open && S.pos >= 0) p.set("row", S.ids[S.pos]);
  history.replaceState(null, "", "?" + p.toString());
}

function restoreState() {
  const p = new URLSearchParams(location.search);
  $("q").value = p.get("q") || "";
  for (const k of FILTERS) if (p.get(k)) ensureOption($("f-" + k), p.get(k));
  $("f-flagged").checked = p.get("flagged") === "1";
  if (p.get("sort")) S.sort = p.get("sort");
  if (p.get("desc")) S.desc = p.get("desc") === "1";
  S.offset = Math.max(0, parseInt(p.get("offset") || "0", 10) || 0);
  return p.get("row");
}

function ensureOption(sel, value) {
  if (![...sel.options].some((o) => o.value === value)) sel.append(el("option", { value, text: value }));
  sel.value = value;
}

async function loadSummary() {
  S.summary = await api("/api/summary");
  const s = S.summary;
  $("run").textContent = `${s.output}  ·  bundle ${s.bundle_id || s.bundle}  ·  threshold ${s.threshold}`;
  $("run").title = `input ${s.input}\nbundle ${s.bundle}`;
  $("reviews-file").textContent = s.reviews_file;
  const saved = localStorage.getItem("raytumor-reviewer");
  $("reviewer").value = saved || s.reviewer || "";
  for (const k of ["label", "view", "source", "kind"]) {
    const sel = $("f-" + k);
    for (const [v, n] of s.facets[k]) if (![...sel.options].some((o) => o.value === v)) sel.append(el("option", { value: v, text: `${v} (${n})` }));
  }
  const vs = $("f-verdict");
  for (const [code, name] of Object.entries(s.verdicts)) if (![...vs.options].some((o) => o.value === code)) vs.append(el("option", { value: code, text: name }));
  showCounts(s.facets);
}

function plural(n, one, many) { return `${n.toLocaleString()} ${n === 1 ? one : many}`; }

function showCounts(f) {
  $("counts").textContent = `${plural(f.total, "row", "rows")} · ${f.flagged.toLocaleString()} flagged · ` +
    `${f.reviewed_flagged.toLocaleString()}/${f.flagged.toLocaleString()} flagged reviewed · ${plural(f.errors, "error", "errors")}`;
}

async function refreshCounts() {
  const s = await api("/api/summary");
  S.summary.facets = s.facets;
  showCounts(s.facets);
}

async function loadRows(keepId) {
  S.loading++;
  try {
    const res = await api("/api/rows?" + params({ offset: S.offset, limit: PAGE }).toString());
    S.ids = res.ids; S.total = res.total; S.rows = res.rows;
    if (S.offset >= S.total && S.total > 0) { S.offset = Math.floor((S.total - 1) / PAGE) * PAGE; return loadRows(keepId); }
    const at = keepId != null ? S.ids.indexOf(Number(keepId)) : -1;
    S.pos = at >= 0 ? at : (S.total ? S.offset : -1);
    renderTable();
  } finally { S.loading--; }
}

function renderTable() {
  const body = $("rows").querySelector("tbody");
  body.replaceChildren();
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.classList.toggle("sorted-asc", th.dataset.sort === S.sort && !S.desc);
    th.classList.toggle("sorted-desc", th.dataset.sort === S.sort && S.desc);
  }
  S.rows.forEach((r, i) => {
    const thumb = r.error ? el("span", { text: "" }) : el("img", { class: "thumb", loading: "lazy", alt: "", src: `/api/rows/${r.id}/thumb.png` });
    thumb.onerror = () => { thumb.replaceWith(el("span", { text: "—" })); };
    const bar = el("span", { class: "bar" }, el("i"));
    if (r.score != null) bar.firstChild.style.width = Math.round(r.score * 100) + "%";
    const tr = el("tr", { class: "row" + (r.flagged ? " flagged" : ""), "data-id": r.id, "data-index": S.offset + i },
      el("td", {}, thumb),
      el("td", { class: "name", text: r.name, title: r.path }),
      el("td", { text: r.kind || "" }),
      el("td", { class: "num" }, document.createTextNode(fmtScore(r.score)), r.score != null ? bar : null),
      el("td", { class: "label", text: r.label || "" }),
      el("td", { text: r.view || "" }),
      el("td", { text: r.in_scope == null ? "" : (r.in_scope ? "yes" : "no"), title: r.scope_reason || "" }),
      el("td", { text: r.source || "" }),
      el("td", { class: "err", text: r.error || "", title: r.error || "" }),
      el("td", { class: r.verdict ? "verdict-" + r.verdict : "", text: verdictName(r.verdict), title: r.note || "" }),
    );
    tr.addEventListener("click", () => { S.pos = S.offset + i; openDetail(); });
    body.append(tr);
  });
  $("empty").hidden = S.total > 0;
  const last = Math.min(S.offset + PAGE, S.total);
  $("range").textContent = S.total ? `rows ${S.offset + 1}–${last} of ${S.total.toLocaleString()}` : "0 rows";
  $("prev-page").disabled = S.offset === 0;
  $("next-page").disabled = last >= S.total;
  markCurrent();
  saveState();
}

function markCurrent() {
  for (const tr of document.querySelectorAll("tr.row")) {
    const cur = Number(tr.dataset.index) === S.pos;
    tr.classList.toggle("current", cur);
    if (cur && !S.open) tr.scrollIntoView({ block: "nearest" });
  }
}

async function moveTo(pos) {
  if (!S.total) return;
  pos = Math.max(0, Math.min(S.total - 1, pos));
  S.pos = pos;
  const page = Math.floor(pos / PAGE) * PAGE;
  if (page !== S.offset) { S.offset = page; await loadRows(S.ids[pos]); }
  markCurrent();
  if (S.open) await openDetail();
  else saveState();
}

async function openDetail() {
  if (S.pos < 0 || S.pos >= S.ids.length) return;
  const id = S.ids[S.pos];
  S.open = true; S.slice = null; S.curve = null;
  $("detail").hidden = false;
  markCurrent();
  saveState();
  const d = await api(`/api/rows/${id}`);
  if (S.ids[S.pos] !== id) return;   // moved on meanwhile
  S.detail = d;
  renderDetail();
}

function closeDetail() { S.open = false; $("detail").hidden = true; saveState(); markCurrent(); }

const FIELD_ORDER = ["path", "kind", "format", "score", "label", "threshold", "view", "view_source", "in_scope", "scope_reason",
  "ood_score", "n_slices", "slice", "score_mean", "score_max", "spacing_mm", "n_files", "n_missing", "reason", "study", "series",
  "source", "error", "adaptation", "bundle_id", "scored_at"];

function renderDetail() {
  const r = S.detail.row;
  $("d-name").textContent = r.name;
  $("d-path").textContent = r.path;
  $("d-pos").textContent = `${S.pos + 1} of ${S.total.toLocaleString()}`;
  $("d-warn").hidden = true;
  const dl = $("d-fields");
  dl.replaceChildren();
  const probs = Object.keys(r).filter((k) => k.startsWith("prob_"));
  for (const k of [...FIELD_ORDER, ...probs]) {
    if (!(k in r) || r[k] == null || r[k] === "" || k === "path") continue;
    let v = r[k];
    if (typeof v === "number" && !Number.isInteger(v)) v = v.toFixed(4);
    if (typeof v === "boolean") v = v ? "yes" : "no";
    dl.append(el("dt", { text: k }), el("dd", { text: String(v) }));
  }
  const scored = r.score != null && !r.error && !r.reason;
  for (const b of document.querySelectorAll("[data-verdict]")) {
    b.classList.toggle("active", b.dataset.verdict === r.verdict);
    b.disabled = !scored;
  }
  $("d-noverdict").hidden = scored;
  // a new verdict starts with an empty note (the last one's note is in the history), or this row's draft
  $("d-note").value = S.drafts[r.id] || "";
  $("d-note").disabled = !scored;
  $("d-saved").textContent = r.verdict ? `${verdictName(r.verdict)} — ${r.reviewer}, ${r.reviewed_at}${r.note ? " — " + r.note : ""}` : "";
  if (S.drafts[r.id]) $("d-saved").textContent += " (a note you typed earlier is not saved yet: give a verdict)";
  const hist = $("d-history");
  hist.replaceChildren();
  for (const h of S.detail.history.slice().reverse()) {
    hist.append(el("li", { text: `${h.reviewed_at} ${h.reviewer}: ${verdictName(h.verdict)}${h.note ? " — " + h.note : ""}` }));
  }
  showPictures();
  $("d-curve").hidden = true;
  $("d-curve-note").hidden = true;
  $("d-cam").textContent = "";
  if (!r.error && !r.reason) loadCurve(r.id);
}

function showPictures() {
  const r = S.detail.row;
  const q = S.slice != null ? `?slice=${S.slice}` : "";
  const c = S.curve;
  const at = (i) => (c && c.indices.indexOf(i) >= 0 ? ` score ${c.scores[c.indices.indexOf(i)].toFixed(3)}` : "");
  $("d-slice").textContent = S.slice != null ? `(slice ${S.slice}:${at(S.slice)})`
    : (r.slice != null ? `(slice ${r.slice}:${at(r.slice)}, the peak of the run that sets the volume score)` : "");
  for (const [img, kind] of [["d-image", "image"], ["d-overlay", "overlay"]]) {
    const node = $(img), msg = $(img + "-msg");
    msg.hidden = true; node.hidden = false;
    if (r.error || r.reason) { node.hidden = true; msg.hidden = false; msg.textContent = r.error ? `error: ${r.error}` : r.reason; continue; }
    node.onerror = async () => {
      node.hidden = true; msg.hidden = false;
      try { await api(`/api/rows/${r.id}/${kind}.png${q}`); } catch (e) { msg.textContent = e.message; }
    };
    node.src = `/api/rows/${r.id}/${kind}.png${q}`;
  }
}

async function loadCurve(id) {
  let c;
  try { c = await api(`/api/rows/${id}/curve.json`); } catch (e) { return; }
  if (!S.detail || S.detail.row.id !== id) return;
  $("d-cam").textContent = `of ${c.cam_class}`;
  if (!c.consistent) {
    $("d-warn").hidden = false;
    $("d-warn").textContent = `Scored ${fmtScore(c.score_stored)} by the run, ${fmtScore(c.score_now)} now: the file or the bundle changed since scoring.`;
  }
  if (c.indices.length > 1) {
    S.curve = c;
    drawCurve(c);
    showPictures();
    const note = $("d-curve-note");
    const k = c.spacing_mm ? Math.max(1, Math.ceil(c.min_extent_mm / c.spacing_mm - 1e-9)) : 1;
    note.textContent = `Volume score ${fmtScore(c.score_stored)} = the lowest slice score over the best run of ${k} consecutive ` +
      `slices (${c.min_extent_mm} mm at ${c.spacing_mm ? c.spacing_mm.toFixed(2) + " mm" : "unknown"} spacing; shaded` +
      `${c.run.length ? `: slices ${c.run[0]}–${c.run[1]}` : ""}); score_max is the highest single slice, prob_* are the shown slice's.`;
    note.hidden = false;
  }
}

function drawCurve(c) {
  const W = 660, H = 170, L = 38, R = 10, T = 14, B = 28;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  const lo = Math.min(...c.indices), hi = Math.max(...c.indices);
  const x = (i) => L + (hi === lo ? 0.5 : (i - lo) / (hi - lo)) * (W - L - R);
  const y = (s) => T + (1 - s) * (H - T - B);
  const add = (tag, attrs, text) => { const e = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); if (text != null) e.textContent = text; svg.append(e); return e; };
  for (const v of [0, 0.5, 1]) { add("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e1e5ea" }); add("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#5b6670" }, v.toFixed(1)); }
  if (c.run.length) add("rect", { x: x(c.run[0]) - 3, y: T, width: Math.max(6, x(c.run[1]) - x(c.run[0]) + 6), height: H - T - B, fill: "#f6d8d0", opacity: 0.7 });
  if (c.view === "axial") add("text", { x: (L + W - R) / 2, y: H - B + 12, "text-anchor": "middle", "font-size": 10, fill: "#5b6670" }, "\u2190 inferior (skull base)   superior (vertex) \u2192");
  for (const i of [lo, hi]) add("text", { x: x(i), y: H - B + 12, "text-anchor": i === lo ? "start" : "end", "font-size": 10, fill: "#5b6670" }, String(i));
  add("line", { x1: L, x2: W - R, y1: y(c.threshold), y2: y(c.threshold), stroke: "#d2553f", "stroke-dasharray": "4 3" });
  add("text", { x: W - R, y: y(c.threshold) - 3, "text-anchor": "end", "font-size": 10, fill: "#d2553f" }, `threshold ${c.threshold.toFixed(2)}`);
  add("polyline", { points: c.indices.map((i, k) => `${x(i)},${y(c.scores[k])}`).join(" "), fill: "none", stroke: "#3a6ea5", "stroke-width": 1.5 });
  const shown = S.slice != null ? S.slice : c.slice;
  c.indices.forEach((i, k) => {
    add("circle", { cx: x(i), cy: y(c.scores[k]), r: i === shown ? 5 : 2.5, fill: i === shown ? "#d2553f" : "#3a6ea5", "pointer-events": "none" });
    // an invisible, wider target per slice: the whole column is clickable, not the 5 px dot
    const w = Math.max(4, (W - L - R) / Math.max(1, c.indices.length));
    const p = add("rect", { x: x(i) - w / 2, y: T, width: w, height: H - T - B, fill: "transparent", class: "hit", "data-slice": i });
    const t = document.createElementNS(ns, "title"); t.textContent = `slice ${i}: ${c.scores[k].toFixed(3)}`; p.append(t);
    p.addEventListener("click", () => { S.slice = i; showPictures(); drawCurve(c); });
  });
  add("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", "font-size": 11, fill: "#5b6670" }, "slice (source index): click anywhere above a slice to see it");
  const box = $("d-curve");
  box.replaceChildren(svg);
  box.hidden = false;
}

async function recordVerdict(verdict) {
  if (!S.open || !S.detail || !$("d-noverdict").hidden) return;
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) { $("d-saved").textContent = "Enter your name (top right) first."; $("reviewer").focus(); return; }
  localStorage.setItem("raytumor-reviewer", reviewer);
  const id = S.detail.row.id;
  try {
    const res = await api(`/api/rows/${id}/review`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ verdict, note: $("d-note").value, reviewer }),
    });
    const i = S.rows.findIndex((r) => r.id === id);
    if (i >= 0) S.rows[i] = res.row;
    delete S.drafts[id];
    renderTable();
    refreshCounts();
    $("d-saved").textContent = `Saved: ${verdictName(verdict)} — ${res.record.reviewer}, ${res.record.reviewed_at}`;
    if ($("advance").checked && S.pos < S.total - 1) await moveTo(S.pos + 1);
    else await openDetail();
  } catch (e) { $("d-saved").textContent = "Not saved: " + e.message; }
}

async function nextUnreviewedFlagged() {
  // the server knows which rows are flagged and unreviewed in this order: ask for them, go to the first after pos
  const res = await api("/api/rows?" + params({ flagged: "1", verdict: "unreviewed", limit: 1 }).toString());
  const cur = S.pos;
  const later = res.ids.map((id) => S.ids.indexOf(id)).filter((k) => k > cur);
  if (later.length) await moveTo(Math.min(...later));
  else if (res.ids.length && S.ids.indexOf(res.ids[0]) >= 0) await moveTo(S.ids.indexOf(res.ids[0]));
}

function onKey(e) {
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
  if (e.key === "Escape") { if (typing) document.activeElement.blur(); else if (S.open) closeDetail(); return; }
  if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key;
  const handled = true;
  if (k === "j" || k === "ArrowDown") moveTo(S.pos + 1);
  else if (k === "k" || k === "ArrowUp") moveTo(S.pos - 1);
  else if (k === "Enter" || k === "o") openDetail();
  else if (k === "1") recordVerdict("tumour");
  else if (k === "2") recordVerdict("no_tumour");
  else if (k === "3") recordVerdict("unsure");
  else if (k === "n" && S.open) $("d-note").focus();
  else if (k === "u") nextUnreviewedFlagged();
  else if (k === "f") { $("f-flagged").checked = !$("f-flagged").checked; S.offset = 0; loadRows(); }
  else if (k === "/") $("q").focus();
  else if (k === "]") { if (S.offset + PAGE < S.total) moveTo(S.offset + PAGE); }
  else if (k === "[") { if (S.offset > 0) moveTo(S.offset - PAGE); }
  else return;
  if (handled) e.preventDefault();
}

let searchTimer = null;
function wire() {
  $("q").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(() => { S.offset = 0; loadRows(); }, 250); });
  for (const k of FILTERS) $("f-" + k).addEventListener("change", () => { S.offset = 0; loadRows(); });
  $("f-flagged").addEventListener("change", () => { S.offset = 0; loadRows(); });
  $("clear").addEventListener("click", () => { $("q").value = ""; for (const k of FILTERS) $("f-" + k).value = ""; $("f-flagged").checked = false; S.offset = 0; loadRows(); });
  for (const th of document.querySelectorAll("th[data-sort]")) th.addEventListener("click", () => {
    const key = th.dataset.sort;
    if (S.sort === key) S.desc = !S.desc; else { S.sort = key; S.desc = key === "score"; }
    S.offset = 0; loadRows();
  });
  $("prev-page").addEventListener("click", () => moveTo(S.offset - PAGE));
  $("next-page").addEventListener("click", () => moveTo(S.offset + PAGE));
  $("d-prev").addEventListener("click", () => moveTo(S.pos - 1));
  $("d-next").addEventListener("click", () => moveTo(S.pos + 1));
  $("d-close").addEventListener("click", closeDetail);
  for (const b of document.querySelectorAll("[data-verdict]")) b.addEventListener("click", () => recordVerdict(b.dataset.verdict));
  $("d-note").addEventListener("input", () => { if (S.detail) S.drafts[S.detail.row.id] = $("d-note").value; });
  $("reviewer").addEventListener("change", () => localStorage.setItem("raytumor-reviewer", $("reviewer").value.trim()));
  document.addEventListener("keydown", onKey);
}

async function start() {
  wire();
  await loadSummary();
  const row = restoreState();
  await loadRows(row);
  if (row != null && S.ids.indexOf(Number(row)) >= 0) openDetail();
  document.body.dataset.ready = "1";
}
start().catch((e) => { document.body.prepend(el("div", { class: "warn", text: "The page could not load: " + e.message })); });
