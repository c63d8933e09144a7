// segjax annotate: the click-to-segment page (no build step, no dependencies).
// Stored annotations come as COCO compressed RLE (column-major runs, starting with 0s),
// predicted candidates as base64 of their packed bits (row-major). Coordinates sent to the
// server are original-image pixels. window.segjaxTimings holds, per prediction, the
// milliseconds from sending the request to the overlay being drawn, window.segjaxModelTimes
// the server's own milliseconds for it (model + mask encoding).
"use strict";

const $ = (id) => document.getElementById(id);
const session = Math.random().toString(36).slice(2, 12);
const COLORS = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
                [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40], [128, 0, 0]];
const CURRENT = [255, 215, 0];
window.segjaxTimings = [];
window.segjaxModelTimes = [];

const S = {
  images: [], categories: [], name: null, img: null, W: 0, H: 0, scale: 1,
  points: [], labels: [], box: null, pred: null, chosen: 0, editing: null,
  past: [], future: [],               // prompt states for click-level undo / redo
  annotations: [], maskCache: new Map(), selected: null,
  proposal: null, opacity: 0.5, inflight: false, dirty: false, drag: null, lastEmbed: null,
};

// ------------------------------------------------------------------ server calls
async function api(method, url, body) {
  busy(+1);
  try {
    const res = await fetch(url, {method, headers: method === "GET" ? {} : {"Content-Type": "application/json"},
                                  body: body ? JSON.stringify(body) : undefined});
    const data = await res.json().catch(() => ({detail: res.statusText}));
    if (!res.ok) throw new Error(data.detail || res.statusText);
    return data;
  } finally { busy(-1); }
}
function busy(d) { document.body.dataset.busy = String(Number(document.body.dataset.busy || 0) + d); }
function say(text) { $("message").textContent = text || ""; }

// ------------------------------------------------------------------ masks
function rleFromString(s) {  // pycocotools rleFrString
  const counts = []; let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k); more = c & 0x20; p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}
function maskCanvas(rle, color) {  // (H, W) COCO RLE -> an HxW canvas, color where the mask is set
  const [h, w] = rle.size;
  const counts = rleFromString(rle.counts);
  const c = document.createElement("canvas"); c.width = w; c.height = h;
  const ctx = c.getContext("2d"); const im = ctx.createImageData(w, h);
  const px = new Uint32Array(im.data.buffer);
  const v = (255 << 24) | (color[2] << 16) | (color[1] << 8) | color[0];  // little-endian RGBA
  let pos = 0;
  for (let i = 0; i < counts.length; i++) {
    const n = counts[i];
    if (i % 2 === 1) {
      for (let k = pos; k < pos + n; k++) { const x = (k / h) | 0, y = k - x * h; px[y * w + x] = v; }
    }
    pos += n;
  }
  ctx.putImageData(im, 0, 0);
  return c;
}
function bitsCanvas(b64, h, w, color) {  // base64 of np.packbits(mask) -> an HxW canvas
  const bytes = atob(b64);
  const c = document.createElement("canvas"); c.width = w; c.height = h;
  const ctx = c.getContext("2d"); const im = ctx.createImageData(w, h);
  const px = new Uint32Array(im.data.buffer), n = w * h;
  const v = (255 << 24) | (color[2] << 16) | (color[1] << 8) | color[0];
  for (let i = 0; i < bytes.length; i++) {
    const byte = bytes.charCodeAt(i);
    if (byte === 0) continue;
    for (let k = 0; k < 8; k++) if (byte & (128 >> k)) { const p = 8 * i + k; if (p < n) px[p] = v; }
  }
  ctx.putImageData(im, 0, 0);
  return c;
}
const colorOf = (id) => COLORS[id % COLORS.length];

// ------------------------------------------------------------------ drawing
function fit() {
  const stage = $("stage"), cv = $("canvas");
  if (!S.img) return;
  S.scale = Math.min(stage.clientWidth / S.W, stage.clientHeight / S.H, 4) || 1;
  cv.width = Math.max(1, Math.round(S.W * S.scale)); cv.height = Math.max(1, Math.round(S.H * S.scale));
  draw();
}
function baseLayer(w, h) {  // the image and the accepted masks at display size, redrawn only when they change
  const key = () => [S.name, w, h, S.opacity, S.editing, S.annotations.map((a) => a.id).join(","),
                     S.maskCache.size].join("|");  // the mask cache is emptied when a mask changes
  if (S.base && S.baseKey === key() && S.baseImg === S.img) return S.base;
  const c = S.base || document.createElement("canvas"); c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.globalAlpha = 1; ctx.drawImage(S.img, 0, 0, w, h);
  ctx.globalAlpha = S.opacity;
  for (const a of S.annotations) {
    if (a.id === S.editing) continue;
    if (!S.maskCache.has(a.id)) S.maskCache.set(a.id, maskCanvas(a.segmentation, colorOf(a.id)));
    ctx.drawImage(S.maskCache.get(a.id), 0, 0, w, h);
  }
  S.base = c; S.baseImg = S.img; S.baseKey = key();
  return c;
}
function draw() {
  const cv = $("canvas"), ctx = cv.getContext("2d");
  if (!S.img) return;
  ctx.imageSmoothingEnabled = false;
  ctx.globalAlpha = 1; ctx.drawImage(baseLayer(cv.width, cv.height), 0, 0);
  ctx.globalAlpha = S.opacity;
  const cur = currentMask();
  if (cur) ctx.drawImage(cur, 0, 0, cv.width, cv.height);
  ctx.globalAlpha = 1;
  for (const a of S.annotations) if (a.id === S.selected) {
    const [x, y, w, h] = a.bbox; ctx.strokeStyle = "#fff"; ctx.lineWidth = 2;
    ctx.strokeRect(x * S.scale, y * S.scale, w * S.scale, h * S.scale);
  }
  const box = S.drag && S.drag.moved ? dragBox(S.drag) : S.box;
  if (box) { ctx.strokeStyle = "#0cf"; ctx.lineWidth = 2;
    ctx.strokeRect(box[0] * S.scale, box[1] * S.scale, (box[2] - box[0]) * S.scale, (box[3] - box[1]) * S.scale); }
  S.points.forEach(([x, y], i) => {
    ctx.beginPath(); ctx.arc(x * S.scale, y * S.scale, 5, 0, 2 * Math.PI);
    ctx.fillStyle = S.labels[i] ? "#0d0" : "#e00"; ctx.fill(); ctx.strokeStyle = "#fff"; ctx.lineWidth = 1.5; ctx.stroke();
  });
}
function currentMask() {
  let pred = S.pred, index = S.chosen;
  if (S.proposal) { pred = S.proposal; index = S.proposal.pos; }
  if (!pred || !pred.candidates.length || index >= pred.candidates.length) return null;
  const cand = pred.candidates[index];
  if (!cand.canvas) cand.canvas = bitsCanvas(cand.bits, pred.size[0], pred.size[1], CURRENT);
  return cand.canvas;
}
function showCandidates() {
  const el = $("candidates"); el.innerHTML = "";
  if (!S.pred) return;
  S.pred.candidates.forEach((c, i) => {
    const s = document.createElement("span");
    s.textContent = `${i + 1}: IoU ${c.score.toFixed(3)}`;
    if (i === S.chosen) s.className = "chosen";
    s.onclick = () => choose(i);
    el.appendChild(s);
  });
}
function choose(i) {
  if (!S.pred || i < 0 || i >= S.pred.candidates.length) return;
  S.chosen = i; showCandidates(); draw();
}

// ------------------------------------------------------------------ images
async function loadImages() {
  const data = await api("GET", "/api/images");
  S.images = data.images; S.categories = data.categories;
  const list = $("image-list"); list.innerHTML = "";
  let done = 0;
  for (const im of S.images) {
    if (im.done) done++;
    const li = document.createElement("li");
    li.dataset.name = im.name;
    li.innerHTML = `<span class="badge">${im.annotations}${im.done ? " \u2713" : ""}</span>`;
    li.append(im.name);
    if (im.name === S.name) li.classList.add("current");
    if (im.done) li.classList.add("done");
    li.onclick = () => openImage(im.name);
    list.appendChild(li);
  }
  $("progress-summary").textContent = `${done} / ${S.images.length} images done, ` +
    `${S.images.reduce((n, im) => n + im.annotations, 0)} masks`;
  const dl = $("category-list"); dl.innerHTML = "";
  for (const c of S.categories) { const o = document.createElement("option"); o.value = c.name; dl.appendChild(o); }
  if (!$("category").value && S.categories.length) $("category").value = S.categories[0].name;
}
async function openImage(name) {
  resetPrompts(); S.proposal = null; $("proposal-bar").hidden = true; S.selected = null;
  S.name = name; S.maskCache.clear(); $("image-name").textContent = name;
  document.body.dataset.embedded = ""; document.body.dataset.opened = "";
  for (const li of $("image-list").children) li.classList.toggle("current", li.dataset.name === name);
  const img = new Image();
  const loaded = new Promise((ok, bad) => { img.onload = ok; img.onerror = () => bad(new Error("cannot load image")); });
  img.src = "/api/image?name=" + encodeURIComponent(name);
  const embedding = embed(name);
  try {
    await loaded;
    if (S.name !== name) return;
    S.img = img; S.W = img.naturalWidth; S.H = img.naturalHeight;
    await loadAnnotations(); fit();
    await embedding;
    if (S.name === name) document.body.dataset.opened = name;  // image, annotations and embedding ready
  } catch (e) { say(e.message); }
}
async function embed(name) {
  const t0 = performance.now(), bar = $("embed-bar"), status = $("embed-status");
  const expected = S.lastEmbed || 2.0;
  const timer = setInterval(() => {
    const s = (performance.now() - t0) / 1000;
    status.textContent = `embedding\u2026 ${s.toFixed(1)} s`;
    bar.style.width = `${Math.min(95, 100 * s / expected)}%`;
  }, 100);
  try {
    const r = await api("POST", "/api/embed", {session, image: name});
    if (!r.cached) S.lastEmbed = r.seconds;
    status.textContent = r.cached ? `embedding from cache (${r.seconds.toFixed(2)} s)`
                                  : `embedded in ${r.seconds.toFixed(2)} s`;
    bar.style.width = "100%";
    if (S.name === name) document.body.dataset.embedded = name;
  } catch (e) { status.textContent = "embedding failed"; say(e.message); }
  finally { clearInterval(timer); }
}
async function loadAnnotations() {
  const data = await api("GET", "/api/annotations?image=" + encodeURIComponent(S.name));
  S.annotations = data.annotations; S.categories = data.categories;
  const names = Object.fromEntries(S.categories.map((c) => [c.id, c.name]));
  const list = $("annotation-list"); list.innerHTML = "";
  for (const a of S.annotations) {
    const li = document.createElement("li"), [r, g, b] = colorOf(a.id);
    li.innerHTML = `<span class="swatch" style="background:rgb(${r},${g},${b})"></span>`;
    li.append(`#${a.id} ${names[a.category_id] || a.category_id} (${a.area} px)`);
    li.dataset.id = a.id;
    if (a.id === S.selected) li.classList.add("selected");
    li.onclick = () => { S.selected = a.id; loadAnnotations().then(draw); };
    list.appendChild(li);
  }
  draw();
}

// ------------------------------------------------------------------ prompts and predictions
function snapshot() { return {points: S.points.slice(), labels: S.labels.slice(), box: S.box, pred: S.pred, chosen: S.chosen}; }
function restore(st) { Object.assign(S, st); S.dirty = false; showCandidates(); draw(); }
function resetPrompts() {
  S.points = []; S.labels = []; S.box = null; S.pred = null; S.chosen = 0; S.editing = null;
  S.past = []; S.future = []; showCandidates();
}
function addPrompt(change) {
  S.past.push(snapshot()); S.future = [];
  change(); draw(); requestPrediction();
}
function requestPrediction() {
  if (S.inflight) { S.dirty = true; return; }
  if (!S.points.length && !S.box) { S.pred = null; showCandidates(); draw(); return; }
  let mask = null;
  if (S.pred) mask = {pred_id: S.pred.pred_id, index: S.chosen};
  else if (S.editing !== null) mask = {annotation: S.editing};
  const multimask = S.points.length === 1 && !S.box && mask === null;
  const body = {session, image: S.name, points: S.points, labels: S.labels, box: S.box, mask, multimask};
  S.inflight = true;
  const t0 = performance.now();
  api("POST", "/api/predict", body).then((r) => {
    S.pred = r; S.chosen = 0;  // candidates come best estimated IoU first
    showCandidates(); draw();
    const ms = performance.now() - t0;
    window.segjaxTimings.push(ms);
    window.segjaxModelTimes.push(1000 * r.seconds);
    $("predict-status").textContent = `mask in ${ms.toFixed(0)} ms (model ${(1000 * r.seconds).toFixed(0)} ms)`;
    document.body.dataset.predictions = String(window.segjaxTimings.length);
  }).catch((e) => say(e.message)).finally(() => {
    S.inflight = false;
    if (S.dirty) { S.dirty = false; requestPrediction(); }
  });
}
function toImage(ev) {
  const r = $("canvas").getBoundingClientRect();
  const x = Math.min(S.W, Math.max(0, (ev.clientX - r.left) / S.scale));
  const y = Math.min(S.H, Math.max(0, (ev.clientY - r.top) / S.scale));
  return [x, y];
}
function dragBox(d) {
  const [a, b] = [d.start, d.end];
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}
function onDown(ev) {
  if (!S.img || S.proposal) return;
  ev.preventDefault();
  S.drag = {start: toImage(ev), end: toImage(ev), moved: false, bg: ev.button === 2 || ev.shiftKey};
}
function onMove(ev) {
  if (!S.drag) return;
  S.drag.end = toImage(ev);
  const dx = (S.drag.end[0] - S.drag.start[0]) * S.scale, dy = (S.drag.end[1] - S.drag.start[1]) * S.scale;
  if (Math.hypot(dx, dy) > 5) S.drag.moved = true;
  if (S.drag.moved) draw();
}
function onUp(ev) {
  if (!S.drag) return;
  S.drag.end = toImage(ev);
  const d = S.drag; S.drag = null;
  if (d.moved) { const box = dragBox(d); addPrompt(() => { S.box = box; }); }
  else addPrompt(() => { S.points.push(d.start); S.labels.push(d.bg ? 0 : 1); });
}

// ------------------------------------------------------------------ annotation actions
function category() {
  const c = $("category").value.trim();
  if (!c) { say("type a category first"); $("category").focus(); }
  return c;
}
async function accept() {
  if (S.proposal) return proposalAccept();
  if (!S.pred || S.inflight) return;
  const cat = category(); if (!cat) return;
  try {
    if (S.editing !== null) {
      await api("PATCH", `/api/annotations/${S.editing}`, {session, pred_id: S.pred.pred_id, index: S.chosen, category: cat});
      S.maskCache.delete(S.editing);
    } else {
      await api("POST", "/api/annotations", {session, image: S.name, pred_id: S.pred.pred_id, index: S.chosen, category: cat});
    }
    resetPrompts(); say(""); await loadAnnotations(); await loadImages();
  } catch (e) { say(e.message); }
}
async function serverHistory(which) {
  try { await api("POST", `/api/${which}`); S.maskCache.clear(); await loadAnnotations(); await loadImages(); say(""); }
  catch (e) { say(e.message); }
}
function undo() {
  if (S.past.length) { S.future.push(snapshot()); restore(S.past.pop()); if (!S.pred && (S.points.length || S.box)) requestPrediction(); }
  else serverHistory("undo");
}
function redo() {
  if (S.future.length) { S.past.push(snapshot()); restore(S.future.pop()); }
  else serverHistory("redo");
}
async function deleteSelected() {
  if (S.selected === null) return say("select a mask in the list first");
  try { await api("DELETE", `/api/annotations/${S.selected}`); S.selected = null; await loadAnnotations(); await loadImages(); }
  catch (e) { say(e.message); }
}
function editSelected() {
  const a = S.annotations.find((x) => x.id === S.selected);
  if (!a) return say("select a mask in the list first");
  resetPrompts(); S.editing = a.id;
  const names = Object.fromEntries(S.categories.map((c) => [c.id, c.name]));
  $("category").value = names[a.category_id] || "";
  say(`editing #${a.id}: click to add points, Enter to save`); draw();
}
async function markDone() {
  const im = S.images.find((x) => x.name === S.name); if (!im) return;
  try { await api("POST", "/api/done", {image: S.name, done: !im.done}); await loadImages(); } catch (e) { say(e.message); }
}
function step(d) {
  const i = S.images.findIndex((x) => x.name === S.name);
  const j = Math.min(S.images.length - 1, Math.max(0, i + d));
  if (j !== i) openImage(S.images[j].name);
}

// ------------------------------------------------------------------ proposals
async function propose() {
  if (!S.name) return;
  resetPrompts(); $("predict-status").textContent = "proposing\u2026";
  try {
    const r = await api("POST", "/api/propose", {session, image: S.name});
    $("predict-status").textContent = `${r.candidates.length} proposals in ${r.seconds.toFixed(2)} s`;
    if (!r.candidates.length) return say("no proposals");
    S.proposal = {...r, pos: 0}; showProposal();
  } catch (e) { say(e.message); }
}
function showProposal() {
  const p = S.proposal;
  if (!p || p.pos >= p.candidates.length) { S.proposal = null; $("proposal-bar").hidden = true; draw(); return; }
  $("proposal-bar").hidden = false;
  $("proposal-pos").textContent = `${p.pos + 1} / ${p.candidates.length} (score ${p.candidates[p.pos].score.toFixed(3)})`;
  draw();
}
async function proposalAccept() {
  const p = S.proposal; const cat = category(); if (!cat || !p) return;
  try {
    await api("POST", "/api/annotations", {session, image: S.name, pred_id: p.pred_id, index: p.pos, category: cat});
    p.pos++; await loadAnnotations(); await loadImages(); showProposal();
  } catch (e) { say(e.message); }
}
function proposalReject() { if (S.proposal) { S.proposal.pos++; showProposal(); } }

// ------------------------------------------------------------------ wiring
function setOpacity(v) { S.opacity = Math.min(1, Math.max(0, v)); $("opacity").value = Math.round(100 * S.opacity); draw(); }
function onKey(ev) {
  if (ev.target.tagName === "INPUT" && ev.target.type !== "range") {
    if (ev.key === "Enter") { ev.preventDefault(); ev.target.blur(); accept(); }
    return;
  }
  const k = ev.key, ctrl = ev.ctrlKey || ev.metaKey;
  if (ctrl && (k === "z" || k === "Z")) { ev.preventDefault(); return ev.shiftKey ? redo() : undo(); }
  if (ctrl && k === "y") { ev.preventDefault(); return redo(); }
  if (ctrl) return;
  if (S.proposal) {
    if (k === "y" || k === "Y" || k === "Enter") return proposalAccept();
    if (k === "n" || k === "N") return proposalReject();
    if (k === "Escape") { S.proposal.pos = S.proposal.candidates.length; return showProposal(); }
  }
  if (k >= "1" && k <= "9") return choose(Number(k) - 1);
  if (k === "Tab") { ev.preventDefault(); if (S.pred) choose((S.chosen + 1) % S.pred.candidates.length); return; }
  if (k === "Enter") return accept();
  if (k === "Escape") { resetPrompts(); return draw(); }
  if (k === "Delete" || k === "Backspace") return deleteSelected();
  if (k === "e" || k === "E") return editSelected();
  if (k === "p" || k === "P") return propose();
  if (k === "d" || k === "D") return markDone();
  if (k === "ArrowRight") return step(1);
  if (k === "ArrowLeft") return step(-1);
  if (k === "[") return setOpacity(S.opacity - 0.1);
  if (k === "]") return setOpacity(S.opacity + 0.1);
}
function init() {
  const cv = $("canvas");
  cv.addEventListener("mousedown", onDown);
  window.addEventListener("mousemove", onMove);
  window.addEventListener("mouseup", onUp);
  cv.addEventListener("contextmenu", (ev) => ev.preventDefault());
  window.addEventListener("keydown", onKey);
  window.addEventListener("resize", fit);
  $("opacity").addEventListener("input", (ev) => setOpacity(ev.target.value / 100));
  $("accept").onclick = accept; $("clear").onclick = () => { resetPrompts(); draw(); };
  $("undo").onclick = undo; $("redo").onclick = redo; $("propose").onclick = propose; $("done").onclick = markDone;
  $("proposal-accept").onclick = proposalAccept; $("proposal-reject").onclick = proposalReject;
  $("proposal-stop").onclick = () => { if (S.proposal) { S.proposal.pos = S.proposal.candidates.length; showProposal(); } };
  document.body.dataset.busy = "0";
  loadImages().then(() => {
    const first = S.images.find((im) => !im.done) || S.images[0];
    if (first) openImage(first.name);
    document.body.dataset.ready = "1";
  }).catch((e) => say(e.message));
}
window.segjax = {state: S, openImage, accept, undo, redo, propose};
init();
