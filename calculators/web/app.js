// The page of `python -m minilora.calc serve`. The form is built from the CLI's own flags
// (/api/form), the answer is /api/vram (what `vram --json` prints for the same flags), the terms are
// drawn as a stacked bar in inline SVG, and the inputs live in the URL, so a link gives the same
// answer. Nothing here computes memory: every number and sentence comes from the API.
"use strict";

const GIB = 2 ** 30;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"];  // matplotlib's, as --plot draws them
const SVG = "http://www.w3.org/2000/svg";
const state = { fields: [], extra: [], request: 0, timer: null };

const $ = (id) => document.getElementById(id);
const gib = (n) => (n / GIB).toLocaleString("en", { minimumFractionDigits: 2, maximumFractionDigits: 2 }) + " GiB";

function control(name) { return $("f-" + name); }

function buildForm() {
  const form = $("form");
  for (const f of state.fields) {
    const label = document.createElement("label");
    label.htmlFor = "f-" + f.name;
    label.textContent = f.name;
    let el;
    if (f.kind === "bool") {
      el = document.createElement("input");
      el.type = "checkbox";
    } else if (f.kind === "choice") {
      el = document.createElement("select");
      for (const c of f.choices) el.add(new Option(c, c));
      el.value = String(f.default);
    } else {
      el = document.createElement("input");
      el.type = "text";
      el.value = f.default === null ? "" : String(f.default);
      el.placeholder = f.default === null ? (f.unset || "") : "";
      if (f.suggestions.length) {
        const list = document.createElement("datalist");
        list.id = "list-" + f.name;
        for (const s of f.suggestions) list.append(new Option(s));
        form.append(list);
        el.setAttribute("list", list.id);
      }
    }
    el.id = "f-" + f.name;
    el.name = f.name;
    el.dataset.default = f.default === null || f.kind === "bool" ? "" : String(f.default);
    el.title = f.help + (f.unset ? " (unset: " + f.unset + ")" : "");
    label.title = el.title;
    form.append(label, el);
  }
}

// The settings that differ from their defaults, as the query of /api/vram and of the page's URL.
function query() {
  const params = new URLSearchParams();
  for (const f of state.fields) {
    const el = control(f.name);
    if (f.kind === "bool") {
      if (el.checked) params.set(f.name, "1");
    } else if (el.value.trim() !== "" && el.value.trim() !== el.dataset.default) {
      params.set(f.name, el.value.trim());
    }
  }
  for (const [k, v] of state.extra) params.append(k, v);  // unknown keys: the API names them in its error
  return params;
}

function fillFromQuery(params) {
  const known = new Set(state.fields.map((f) => f.name));
  state.extra = [...params].filter(([k]) => !known.has(k));
  for (const f of state.fields) {
    if (!params.has(f.name)) continue;
    const el = control(f.name);
    if (f.kind === "bool") el.checked = ["1", "true", "on", "yes"].includes(params.get(f.name).toLowerCase());
    else el.value = params.get(f.name);
  }
}

function changed() {
  state.extra = [];
  clearTimeout(state.timer);
  state.timer = setTimeout(update, 200);
}

async function update() {
  const search = query().toString();
  history.replaceState(null, "", search ? "?" + search : location.pathname);
  $("share").href = location.href;
  $("share").textContent = location.href;
  const id = ++state.request;
  document.body.dataset.state = "loading";
  const response = await fetch("/api/vram?" + search);
  const body = await response.json();
  if (id !== state.request) return;  // a newer request is on its way
  document.body.dataset.query = search;
  $("error").hidden = response.ok;
  $("error").textContent = response.ok ? "" : body.error;
  $("json").textContent = JSON.stringify(body, null, 2);
  if (response.ok) render(body); else clear();
  document.body.dataset.state = response.ok ? "ok" : "error";
}

function clear() {
  $("answer").textContent = "";
  $("bar").replaceChildren();
  $("terms").replaceChildren();
  $("peak").textContent = "";
}

function render(body) {
  $("answer").textContent = body.answer;
  const colors = new Map(body.terms.map((t, i) => [t.name, COLORS[i % COLORS.length]]));
  drawBar(body, colors);
  const host = body.terms.some((t) => t.cpu);  // a CPU column only where a term holds host memory
  const rows = [["", "term", "GPU", "CPU", "assumption"]].concat(body.terms.map((t) =>
    [colors.get(t.name), t.name, gib(t.gpu), t.cpu ? gib(t.cpu) : "", t.assumption]))
    .map((r) => (host ? r : r.filter((_, j) => j !== 3)));
  $("terms").replaceChildren(...rows.map((r, i) => {
    const tr = document.createElement("tr");
    r.slice(1).forEach((v, j) => {
      const cell = document.createElement(i ? "td" : "th");
      if (j === 0 && i) {
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = r[0];
        cell.append(swatch);
      }
      cell.append(v);
      if (i) cell.className = j === 0 ? "term" : j < r.length - 2 ? "bytes" : "";
      tr.append(cell);
    });
    return tr;
  }));
  $("peak").textContent = body.peak_explained;
}

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// One segment per term alive at the peak (solid; they end at the total), then the terms alive only
// at another moment of the step (faded), and a dashed line at the GPU (--gpu, else the smallest
// GPU in the table that fits), as `vram --plot` draws them.
function drawBar(body, colors) {
  const width = 860, left = 10, right = 20, y = 34, h = 40;
  const gpu = body.gpu || body.fits_on[0] || null;
  const sum = body.bar.reduce((a, s) => a + s.bytes, 0);
  const scale = (width - left - right) / (Math.max(sum, gpu ? gpu.memory : 0) * 1.04 || 1);
  const parts = [];
  let x = left;
  for (const s of body.bar) {
    const w = s.bytes * scale;
    const rect = svg("rect", { x, y, width: w, height: h, fill: colors.get(s.term), opacity: s.at_peak ? 1 : 0.35,
                               stroke: "#fff", "data-term": s.term, "data-at-peak": s.at_peak, "data-bytes": s.bytes });
    rect.append(svg("title", {}, `${s.term}: ${gib(s.bytes)}${s.at_peak ? "" : " (not alive at the peak)"}`));
    parts.push(rect);
    x += w;
  }
  const step = [1, 2, 5, 10, 20, 50, 100, 200, 500].find((s) => (width - left - right) / scale / GIB / s <= 8) || 1000;
  for (let g = 0; g * GIB * scale <= width - left - right; g += step) {
    parts.push(svg("line", { x1: left + g * GIB * scale, x2: left + g * GIB * scale, y1: y + h, y2: y + h + 5,
                             stroke: "#666" }),
               svg("text", { x: left + g * GIB * scale, y: y + h + 40, "text-anchor": g ? "middle" : "start",
                             fill: "#666" }, String(g)));
  }
  parts.push(svg("text", { x: width - right, y: y + h + 40, "text-anchor": "end", fill: "#666" }, "GiB"));
  const total = left + body.total_gpu_bytes * scale;
  parts.push(svg("line", { x1: total, x2: total, y1: y - 8, y2: y + h + 8, stroke: "#000" }),
             svg("text", { x: total + 4, y: y + h + 22 }, "total " + gib(body.total_gpu_bytes)));
  if (gpu) {
    const g = left + gpu.memory * scale;
    parts.push(svg("line", { x1: g, x2: g, y1: 8, y2: y + h + 8, stroke: "#000", "stroke-dasharray": "5 4" }),
               svg("text", { x: g - 4, y: 20, "text-anchor": "end" }, `${gpu.name}: ${gib(gpu.memory)}`));
  }
  $("bar").replaceChildren(...parts);
}

async function start() {
  state.fields = await (await fetch("/api/form")).json();
  buildForm();
  // a first visit starts from an example (it shows in the form and the URL); a link restores its own
  fillFromQuery(new URLSearchParams(location.search || "?model=llama-3-8b&method=qlora"));
  $("form").addEventListener("input", changed);
  $("form").addEventListener("change", changed);
  $("form").addEventListener("submit", (e) => { e.preventDefault(); update(); });
  await update();
}

start();
