// aegir browse: filters -> /api/chips -> thumbnail grid + SVG map of chip footprints (lon/lat, no external assets).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const PAGE = 60;
const $ = (id) => document.getElementById(id);
const state = { version: null, filters: { dataset: "", provenance: "", s2: "" }, chips: [], total: 0, cell: null,
  facets: null, view: null, selected: null, loads: 0 };

// ---------------------------------------------------------------------------------------------- data

async function api(path, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null));
  const response = await fetch(`${path}?${query}`);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function option(value, label) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = label;
  return el;
}

async function loadVersions() {
  const info = await api("/api/versions");
  $("location").textContent = info.location;
  const select = $("version");
  select.replaceChildren(option("", `latest (v${info.latest})`));
  for (const v of [...info.versions].reverse()) {
    select.append(option(String(v.version), `v${v.version} · ${v.rows} rows · ${(v.timestamp || "").slice(0, 19)}`));
  }
  if (state.version === null && info.default !== null) state.version = info.default;
  select.value = state.version === null ? "" : String(state.version);
}

function fillFacet(select, values, current) {
  select.replaceChildren(option("", "all"));
  for (const f of values) select.append(option(f.value, `${f.value} (${f.count})`));
  select.value = values.some((f) => f.value === current) ? current : "";
}

async function loadFacets() {
  state.facets = await api("/api/facets", { version: state.version });
  fillFacet($("f-dataset"), state.facets.datasets, state.filters.dataset);
  fillFacet($("f-provenance"), state.facets.provenances, state.filters.provenance);
  $("s2-cells").replaceChildren(...state.facets.s2_l10.map((f) => option(f.value, `level 10 · ${f.count} chips`)));
  state.filters.dataset = $("f-dataset").value;
  state.filters.provenance = $("f-provenance").value;
}

async function loadChips(append = false) {
  document.body.dataset.state = "loading";
  const page = await api("/api/chips", { ...state.filters, version: state.version, limit: PAGE,
    offset: append ? state.chips.length : 0 });
  state.total = page.total;
  state.cell = page.s2_cell;
  state.pageVersion = page.version;
  state.chips = append ? state.chips.concat(page.chips) : page.chips;
  renderGrid(append ? page.chips : null);
  if (!append) state.view = null;
  renderMap();
  renderSummary();
  state.loads += 1;
  document.body.dataset.loads = String(state.loads);
  document.body.dataset.state = "ready";
}

async function applyFilters() {
  state.filters = { dataset: $("f-dataset").value, provenance: $("f-provenance").value,
    s2: $("f-s2").value.trim().toLowerCase() };
  const url = new URLSearchParams(Object.entries({ ...state.filters, version: state.version ?? "" })
    .filter(([, v]) => v !== ""));
  history.replaceState(null, "", url.toString() ? `?${url}` : location.pathname);
  try {
    showError("");
    await loadChips();
  } catch (err) {
    showError(err.message);
    document.body.dataset.state = "error";
  }
}

// ---------------------------------------------------------------------------------------------- grid

function s2Link(token) {
  const a = document.createElement("a");
  a.textContent = token;
  a.title = `show the chips in S2 cell ${token}`;
  a.addEventListener("click", () => { $("f-s2").value = token; applyFilters(); });
  return a;
}

function card(chip) {
  const fig = document.createElement("figure");
  fig.className = "card";
  fig.dataset.uuid = chip.uuid;
  const img = document.createElement("img");
  img.src = `/api/thumb/${encodeURIComponent(chip.uuid)}.png?version=${state.pageVersion}`;
  img.alt = chip.sample_id;
  img.decoding = "async";
  const cap = document.createElement("figcaption");
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = chip.sample_id;
  name.title = `${chip.sample_id}\nuuid ${chip.uuid}`;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `${chip.dataset} · ${chip.provenance}`;
  meta.title = `dataset ${chip.dataset}\nprovenance (mask source) ${chip.provenance}\nbackend ${chip.backend ?? "-"}`;
  const date = document.createElement("span");
  date.className = "meta";
  const pv = chip.pv_fraction === null ? "no mask" : `PV ${(100 * chip.pv_fraction).toFixed(1)} %`;
  date.textContent = `${pv} · ${(chip.acquired_at || chip.created_at || "date ?").slice(0, 10)}`;
  date.title = `acquired ${chip.acquired_at || "unknown"}\nadded ${chip.created_at}\nflywheel round ${chip.round}`;
  const s2 = document.createElement("span");
  s2.className = "s2";
  s2.append("S2 ", s2Link(chip.s2.l10), " › ", s2Link(chip.s2.l13), " › ", s2Link(chip.s2.l17));
  cap.append(name, meta, date, s2);
  fig.append(img, cap);
  fig.addEventListener("mouseenter", () => highlight(chip.uuid, true));
  fig.addEventListener("mouseleave", () => highlight(chip.uuid, false));
  fig.addEventListener("click", (e) => { if (e.target.tagName !== "A") select(chip.uuid, false); });
  return fig;
}

function renderGrid(added) {
  const grid = $("grid");
  if (!added) {
    grid.replaceChildren();
    $("grid-pane").scrollTop = 0;
  }
  for (const chip of added || state.chips) grid.append(card(chip));
  if (!state.chips.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = "No chips match these filters.";
    grid.append(empty);
  }
  $("more").hidden = state.chips.length >= state.total;
  $("more").textContent = `Load more (${state.total - state.chips.length} left)`;
}

function renderSummary() {
  const rows = state.facets ? state.facets.rows : "?";
  const active = Object.entries(state.filters).filter(([, v]) => v).map(([k, v]) => `${k} ${v}`);
  $("summary").textContent = `${state.total} of ${rows} chips` + (active.length ? ` · ${active.join(" · ")}` : "")
    + (state.chips.length < state.total ? ` · showing ${state.chips.length}` : "");
}

function highlight(uuid, on) {
  document.querySelectorAll(`[data-uuid="${CSS.escape(uuid)}"]`).forEach((el) => el.classList.toggle("hot", on));
}

function select(uuid, scroll) {
  document.querySelectorAll(".card.selected").forEach((el) => el.classList.remove("selected"));
  state.selected = uuid;
  const el = document.querySelector(`.card[data-uuid="${CSS.escape(uuid)}"]`);
  if (el) {
    el.classList.add("selected");
    if (scroll) el.scrollIntoView({ block: "center", behavior: "smooth" });
  }
}

// ---------------------------------------------------------------------------------------------- map

function svg(tag, attrs = {}, parent = null) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.append(el);
  return el;
}

function chipBounds() {
  const pts = [];
  for (const c of state.chips) pts.push(...(c.footprint || [c.centroid]));
  if (state.cell) pts.push(...state.cell);
  if (!pts.length && state.facets && state.facets.extent) {
    const [a, b, c, d] = state.facets.extent;
    pts.push([a, b], [c, d]);
  }
  if (!pts.length) return null;
  const lons = pts.map((p) => p[0]), lats = pts.map((p) => p[1]);
  return [Math.min(...lons), Math.min(...lats), Math.max(...lons), Math.max(...lats)];
}

function fitView(width, height) {
  const b = chipBounds();
  if (!b) return null;
  const lat0 = (b[1] + b[3]) / 2, kx = Math.cos((lat0 * Math.PI) / 180);
  const spanX = Math.max((b[2] - b[0]) * kx, 1e-5), spanY = Math.max(b[3] - b[1], 1e-5);
  const scale = 0.88 * Math.min(width / spanX, height / spanY);
  return { lon: (b[0] + b[2]) / 2, lat: lat0, kx, scale };
}

function niceStep(span, target) {
  const raw = span / target, pow = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * pow).find((s) => s >= raw);
}

function fmtDeg(value, step, pos, neg) {
  const digits = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  return `${Math.abs(value).toFixed(digits)}°${value >= 0 ? pos : neg}`;
}

function renderMap() {
  const map = $("map");
  const { width, height } = map.getBoundingClientRect();
  map.setAttribute("viewBox", `0 0 ${width} ${height}`);
  map.replaceChildren();
  if (!state.view) state.view = fitView(width, height);
  const v = state.view;
  if (!v || width === 0) {
    svg("text", { x: 20, y: 30, class: "empty" }, map).textContent = "No chips to show.";
    return;
  }
  const px = ([lon, lat]) => [width / 2 + (lon - v.lon) * v.kx * v.scale, height / 2 - (lat - v.lat) * v.scale];
  const lonAt = (x) => v.lon + (x - width / 2) / (v.kx * v.scale);
  const latAt = (y) => v.lat - (y - height / 2) / v.scale;
  drawGraticule(map, px, lonAt(0), lonAt(width), latAt(height), latAt(0), width, height);
  if (state.cell) {
    svg("polygon", { class: "cell", points: state.cell.map((p) => px(p).join(",")).join(" ") }, map);
  }
  const chips = svg("g", {}, map);
  for (const chip of state.chips) drawChip(chips, chip, px);
  drawScale(map, v, height);
  drawNorth(map, width);
  if (!state.chips.length) svg("text", { x: 20, y: 30, class: "empty" }, map).textContent = "No chips match.";
}

function drawChip(group, chip, px) {
  const attrs = { "data-uuid": chip.uuid };
  let small = true;
  if (chip.footprint) {
    const pts = chip.footprint.map(px);
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    small = Math.max(...xs) - Math.min(...xs) < 7 && Math.max(...ys) - Math.min(...ys) < 7;
    if (!small) svg("polygon", { ...attrs, class: "chip", points: pts.map((p) => p.join(",")).join(" ") }, group);
  }
  if (small) {
    const [x, y] = px(chip.centroid);
    svg("circle", { ...attrs, class: "dot", cx: x, cy: y, r: 4.5 }, group);
  }
  const el = group.lastChild;
  if (state.selected === chip.uuid) el.classList.add("hot");
  el.addEventListener("mouseenter", (e) => { highlight(chip.uuid, true); tooltip(e, chip); });
  el.addEventListener("mousemove", (e) => tooltip(e, chip));
  el.addEventListener("mouseleave", () => { highlight(chip.uuid, false); $("tooltip").hidden = true; });
  el.addEventListener("click", () => select(chip.uuid, true));
}

function tooltip(event, chip) {
  const tip = $("tooltip"), box = $("map-pane").getBoundingClientRect();
  tip.textContent = `${chip.sample_id} · ${chip.dataset} · ${chip.provenance} · S2 ${chip.s2.l13}`;
  tip.style.left = `${event.clientX - box.left + 12}px`;
  tip.style.top = `${event.clientY - box.top + 12}px`;
  tip.hidden = false;
}

function drawGraticule(map, px, west, east, south, north, width, height) {
  const g = svg("g", { class: "grat" }, map);
  const lonStep = niceStep(east - west, 5), latStep = niceStep(north - south, 5);
  for (let lon = Math.ceil(west / lonStep) * lonStep; lon <= east; lon += lonStep) {
    const [x] = px([lon, 0]);
    svg("line", { x1: x, x2: x, y1: 0, y2: height }, g);
    svg("text", { x: x + 3, y: height - 6 }, g).textContent = fmtDeg(lon, lonStep, "E", "W");
  }
  for (let lat = Math.ceil(south / latStep) * latStep; lat <= north; lat += latStep) {
    const [, y] = px([0, lat]);
    svg("line", { x1: 0, x2: width, y1: y, y2: y }, g);
    svg("text", { x: 4, y: y - 4 }, g).textContent = fmtDeg(lat, latStep, "N", "S");
  }
}

function drawScale(map, v, height) {
  const metresPerPx = 111320 / v.scale, raw = metresPerPx * 120, pow = 10 ** Math.floor(Math.log10(raw));
  const metres = [5, 2, 1].map((m) => m * pow).find((m) => m <= raw);
  const len = metres / metresPerPx;
  const g = svg("g", { class: "scale", transform: `translate(${14},${height - 34})` }, map);
  svg("rect", { x: 0, y: 0, width: len, height: 4 }, g);
  svg("text", { x: 0, y: -4 }, g).textContent = metres >= 1000 ? `${metres / 1000} km` : `${metres} m`;
}

function drawNorth(map, width) {
  const g = svg("g", { class: "north", transform: `translate(${width - 24},16)` }, map);
  svg("path", { d: "M0 0 L6 16 L0 12 L-6 16 Z" }, g);
  svg("text", { x: -4, y: 30 }, g).textContent = "N";
}

function zoom(factor, cx, cy) {
  const v = state.view;
  if (!v) return;
  const { width, height } = $("map").getBoundingClientRect();
  const x = cx ?? width / 2, y = cy ?? height / 2;
  const lon = v.lon + (x - width / 2) / (v.kx * v.scale), lat = v.lat - (y - height / 2) / v.scale;
  v.scale *= factor;
  v.lon = lon - (x - width / 2) / (v.kx * v.scale);
  v.lat = lat + (y - height / 2) / v.scale;
  renderMap();
}

function wireMap() {
  const map = $("map");
  let drag = null;
  map.addEventListener("pointerdown", (e) => {
    if (!state.view) return;
    drag = { x: e.clientX, y: e.clientY, lon: state.view.lon, lat: state.view.lat, moved: false };
  });
  map.addEventListener("pointermove", (e) => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (!drag.moved && Math.hypot(dx, dy) < 3) return;
    if (!drag.moved) { map.setPointerCapture(e.pointerId); map.classList.add("dragging"); }
    drag.moved = true;
    state.view.lon = drag.lon - dx / (state.view.kx * state.view.scale);
    state.view.lat = drag.lat + dy / state.view.scale;
    renderMap();
  });
  const end = () => { drag = null; map.classList.remove("dragging"); };
  map.addEventListener("pointerup", end);
  map.addEventListener("pointercancel", end);
  map.addEventListener("wheel", (e) => {
    e.preventDefault();
    const box = map.getBoundingClientRect();
    zoom(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - box.left, e.clientY - box.top);
  }, { passive: false });
  $("zoom-in").addEventListener("click", () => zoom(1.5));
  $("zoom-out").addEventListener("click", () => zoom(1 / 1.5));
  $("fit").addEventListener("click", () => { state.view = null; renderMap(); });
  new ResizeObserver(() => { state.view = null; renderMap(); }).observe(map);
}

// ---------------------------------------------------------------------------------------------- start

async function start() {
  const params = new URLSearchParams(location.search);
  state.filters = { dataset: params.get("dataset") || "", provenance: params.get("provenance") || "",
    s2: (params.get("s2") || "").toLowerCase() };
  state.version = params.get("version") ? Number(params.get("version")) : null;
  $("f-s2").value = state.filters.s2;
  wireMap();
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); applyFilters(); });
  $("f-dataset").addEventListener("change", applyFilters);
  $("f-provenance").addEventListener("change", applyFilters);
  $("clear").addEventListener("click", () => {
    $("f-dataset").value = ""; $("f-provenance").value = ""; $("f-s2").value = ""; applyFilters();
  });
  $("more").addEventListener("click", () => loadChips(true).catch((err) => showError(err.message)));
  $("version").addEventListener("change", async () => {
    state.version = $("version").value ? Number($("version").value) : null;
    try { showError(""); await loadFacets(); await applyFilters(); } catch (err) { showError(err.message); }
  });
  try {
    await loadVersions();
    await loadFacets();
    await loadChips();
  } catch (err) {
    showError(err.message);
    document.body.dataset.state = "error";
  }
}

start();
