// PCCNet studio page: plain DOM code, no framework, nothing fetched from anywhere but this studio.
// Text from the server (file names, messages) only ever goes into textContent, never into HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  memory: null,        // chosen memory name
  memories: [],        // from /api/memories
  photos: [],          // [{id, name, width, height}] in upload order
  shown: {},           // photo id -> {job, memory, result} currently displayed
  job: null,           // id of the job whose results are applied
  usesMemory: true,
};

// ---- talking to the studio -------------------------------------------------------------------------
async function api(path, options = {}) {
  const opts = Object.assign({}, options);
  if (opts.method && opts.method !== "GET") {
    opts.headers = Object.assign({"X-PCCNet-Studio": "1"}, opts.headers || {});
  }
  let response;
  try {
    response = await fetch(path, opts);
  } catch (e) {
    throw new Error("the studio does not answer (was it stopped?)");
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}: ${text.slice(0, 200)}`);
  }
  return body;
}

function postJSON(path, data) {
  return api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(data)});
}

function message(kind, text) {
  const box = document.createElement("div");
  box.className = kind;
  box.dataset.testid = kind;
  const span = document.createElement("span");
  span.textContent = text;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "×";
  close.title = "dismiss";
  close.addEventListener("click", () => box.remove());
  box.append(span, close);
  $(kind === "error" ? "errors" : "notes").append(box);
}
const showError = (text) => message("error", text);
const showNote = (text) => message("note", text);

async function guard(fn) {
  try { await fn(); } catch (e) { showError(e.message); }
}

function paletteStrip(palette, vertical = false) {
  const strip = document.createElement("div");
  strip.className = "palette";
  strip.title = "the stored colour distribution: its heaviest colours";
  for (const p of palette || []) {
    const s = document.createElement("span");
    s.style.background = p.color;
    s.style[vertical ? "height" : "width"] = `${Math.max(4, p.share * 100)}%`;
    strip.append(s);
  }
  return strip;
}

// ---- memories --------------------------------------------------------------------------------------
async function loadMemories(select) {
  const {memories} = await api("/api/memories");
  state.memories = memories;
  const chooser = $("memory");
  chooser.replaceChildren();
  for (const m of memories) {
    const opt = document.createElement("option");
    opt.value = m.name;
    opt.textContent = `${m.name} — ${m.written} of ${m.capacity} slots` + (m.compatible ? "" : " (other model)");
    opt.disabled = !m.compatible;
    chooser.append(opt);
  }
  const usable = memories.filter((m) => m.compatible).map((m) => m.name);
  const want = [select, state.memory].find((n) => n && usable.includes(n)) || usable[0] || null;
  if (want) chooser.value = want;
  const changed = want !== state.memory;
  state.memory = want;
  describeMemory();
  return changed;
}

function describeMemory() {
  const m = state.memories.find((x) => x.name === state.memory);
  $("memory-info").textContent = m ? `${m.written} exemplar slots written of ${m.capacity}` :
    "no memory yet: create one and add a few colour photos";
  const link = $("download-pack");
  link.href = m ? `/api/memories/${encodeURIComponent(m.name)}/pack` : "#";
  link.setAttribute("download", m ? `${m.name}.pack` : "");
}

async function loadSlots() {
  const box = $("slots");
  if (!state.memory) { box.replaceChildren(); $("slot-count").textContent = ""; return; }
  const data = await api(`/api/memories/${encodeURIComponent(state.memory)}/slots`);
  $("slot-count").textContent = data.listed ? `(${data.written})` : `(${data.written}, too many to list)`;
  box.replaceChildren(...data.slots.map((s) => slotTile(s)));
}

function slotTile(s) {
  const fig = document.createElement("figure");
  fig.className = "slot";
  fig.dataset.testid = "slot";
  fig.dataset.slot = s.slot;
  if (s.thumb) {
    const img = document.createElement("img");
    img.src = `/api/thumbs/${s.thumb}`;
    img.alt = s.name;
    fig.append(img);
  } else {
    fig.append(paletteStrip(s.palette, true));
  }
  const cap = document.createElement("figcaption");
  cap.textContent = s.name ? `${s.slot} · ${s.name}` : `slot ${s.slot}`;
  cap.title = cap.textContent;
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "×";
  remove.title = "remove this exemplar (frees its slot)";
  remove.dataset.testid = "remove-slot";
  remove.addEventListener("click", () => guard(async () => {
    await api(`/api/memories/${encodeURIComponent(state.memory)}/slots/${s.slot}`, {method: "DELETE"});
    await refreshMemory(true);
  }));
  fig.append(cap, remove);
  return fig;
}

async function refreshMemory(recolor) {
  await loadMemories(state.memory);
  await loadSlots();
  if (recolor) await colorize(state.photos.map((p) => p.id));
}

async function createMemory(event) {
  event.preventDefault();
  const name = $("new-memory").value.trim();
  if (!name) { showError("type a name for the new memory first"); return; }
  await guard(async () => {
    await postJSON("/api/memories", {name});
    $("new-memory").value = "";
    await loadMemories(name);
    await loadSlots();
    await colorize(state.photos.map((p) => p.id));
  });
}

function formWith(files, field = "files") {
  const form = new FormData();
  for (const f of files) form.append(field, f, f.name);
  return form;
}

async function addExemplars(files) {
  if (!files.length) return;
  if (!state.memory) { showError("create or choose a memory before adding exemplars"); return; }
  await guard(async () => {
    const result = await api(`/api/memories/${encodeURIComponent(state.memory)}/exemplars`,
                             {method: "POST", body: formWith(files)});
    result.errors.forEach(showError);
    if (result.note) showNote(result.note);
    if (result.written.length) await refreshMemory(true);
  });
}

async function importPack(file) {
  if (!file) return;
  await guard(async () => {
    const form = new FormData();
    form.append("pack", file, file.name);
    form.append("name", $("pack-name").value.trim());
    form.append("replace", $("pack-replace").checked ? "1" : "");
    const done = await api("/api/packs", {method: "POST", body: form});
    (done.warnings || []).forEach(showNote);
    showNote(`imported memory ${done.name}: ${done.written} of ${done.capacity} slots written`);
    await loadMemories(done.name);
    await loadSlots();
    await colorize(state.photos.map((p) => p.id));
  });
}

// ---- photos and results -------------------------------------------------------------------------------
const UPLOAD_CHUNK = 8;  // photos per request: the page shows upload progress and no request grows huge

async function addPhotos(files) {
  if (!files.length) return;
  await guard(async () => {
    let added = 0;
    for (let i = 0; i < files.length; i += UPLOAD_CHUNK) {
      $("progress-text").textContent = `uploading ${i} / ${files.length} photo(s)…`;
      const result = await api("/api/photos", {method: "POST", body: formWith(files.slice(i, i + UPLOAD_CHUNK))});
      result.errors.forEach(showError);
      for (const p of result.photos) {
        state.photos.push(p);
        $("results").append(resultRow(p));
      }
      added += result.photos.length;
    }
    updateButtons();
    if (added) await colorize(pendingPhotos());
    else $("progress-text").textContent = "";
  });
}

function pendingPhotos() {
  return state.photos.filter((p) => {
    const s = state.shown[p.id];
    return !s || s.memory !== state.memory;
  }).map((p) => p.id);
}

function resultRow(p) {
  const row = document.createElement("div");
  row.className = "result-row";
  row.dataset.testid = "result-row";
  row.dataset.photo = p.id;
  const input = document.createElement("figure");
  const gray = document.createElement("img");
  gray.src = `/api/photos/${p.id}/gray`;
  gray.alt = `${p.name} in gray`;
  gray.dataset.testid = "input";
  const cap = document.createElement("figcaption");
  cap.textContent = `${p.name} · ${p.width}×${p.height}`;
  input.append(gray, cap);
  const output = document.createElement("figure");
  output.className = "output";
  const pending = document.createElement("div");
  pending.className = "pending";
  output.append(pending);
  const answer = document.createElement("figure");
  answer.className = "answer";
  row.append(input, output, answer);
  return row;
}

function showResult(jobId, r) {
  const row = document.querySelector(`.result-row[data-photo="${r.photo}"]`);
  if (!row) return;
  const output = row.querySelector(".output");
  const answer = row.querySelector(".answer");
  if (r.error) {
    showError(`${r.name || "photo"}: ${r.error}`);
    return;
  }
  const url = `/api/jobs/${jobId}/results/${r.photo}`;
  const img = document.createElement("img");
  img.src = url;
  img.alt = `${r.name} colorized`;
  img.dataset.testid = "result";
  img.dataset.memory = r.memory || "";
  const cap = document.createElement("figcaption");
  const link = document.createElement("a");
  link.href = url;
  link.download = "";
  link.textContent = "download";
  link.dataset.testid = "download-result";
  cap.append(`with ${r.memory || "no memory"} · `, link);
  output.replaceChildren(img, cap);
  const parts = [];
  if (r.thumb) {
    const t = document.createElement("img");
    t.src = `/api/thumbs/${r.thumb}`;
    t.alt = r.exemplar || "";
    parts.push(t);
  } else if (r.palette && r.palette.length) {
    parts.push(paletteStrip(r.palette));
  }
  const why = document.createElement("figcaption");
  why.dataset.testid = "answer";
  why.textContent = r.slot === null || r.slot === undefined
    ? (state.usesMemory ? "no exemplar in this memory answered" : "this model does not use a memory")
    : `${r.exemplar} (slot ${r.slot}) · similarity ${r.similarity.toFixed(3)}`;
  parts.push(why);
  answer.replaceChildren(...parts);
  state.shown[r.photo] = {job: jobId, memory: r.memory};
}

async function colorize(photoIds) {
  if (!photoIds.length) return;
  if (state.usesMemory && !state.memory) {
    $("progress-text").textContent = "choose or create a memory to colorize";
    return;
  }
  const chosen = state.memories.find((m) => m.name === state.memory);
  if (state.usesMemory && chosen && chosen.written === 0) {
    $("progress-text").textContent = `add colour exemplars to ${chosen.name} to colorize with it`;
    return;
  }
  const previous = state.job;
  const job = await postJSON("/api/jobs", {memory: state.memory, photos: photoIds});
  state.job = job.id;
  if (previous) api(`/api/jobs/${previous}`, {method: "DELETE"}).catch(() => {});
  await follow(job.id);
}

async function follow(jobId) {
  const applied = new Set();
  for (;;) {
    if (state.job !== jobId) return;  // a newer job took over
    const job = await api(`/api/jobs/${jobId}`);
    for (const r of job.results) {
      if (!applied.has(r.photo)) { applied.add(r.photo); showResult(jobId, r); }
    }
    $("progress").max = Math.max(1, job.total);
    $("progress").value = job.done;
    $("progress-text").textContent = job.state === "running"
      ? `colorizing ${job.done} / ${job.total}…` : `${job.done} / ${job.total} colorized with ${job.memory || "-"}`;
    updateButtons();
    if (job.state !== "running") return;
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function updateButtons() {
  const any = Object.keys(state.shown).length > 0;
  $("download-all").disabled = !any;
  $("clear-photos").disabled = state.photos.length === 0;
}

async function downloadAll() {
  await guard(async () => {
    const items = state.photos.filter((p) => state.shown[p.id]).map((p) => ({job: state.shown[p.id].job, photo: p.id}));
    const response = await fetch("/api/zip", {method: "POST", body: JSON.stringify({items}),
      headers: {"Content-Type": "application/json", "X-PCCNet-Studio": "1"}});
    if (!response.ok) throw new Error((await response.json()).error);
    const url = URL.createObjectURL(await response.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = "colorized.zip";
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  });
}

function clearPhotos() {
  state.photos = [];
  state.shown = {};
  state.job = null;
  $("results").replaceChildren();
  $("progress").value = 0;
  $("progress-text").textContent = "no photos yet";
  updateButtons();
}

// ---- drag and drop onto the two drop zones -----------------------------------------------------------------
function dropZone(zone, input, handler) {
  input.addEventListener("change", async () => {
    const files = Array.from(input.files);
    await handler(files);
    input.value = "";
  });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    handler(Array.from(e.dataTransfer.files));
  });
}

async function start() {
  dropZone($("exemplar-drop"), $("exemplars"), addExemplars);
  dropZone($("photo-drop"), $("photos"), addPhotos);
  $("create-form").addEventListener("submit", createMemory);
  $("memory").addEventListener("change", () => guard(async () => {
    state.memory = $("memory").value;
    describeMemory();
    await loadSlots();
    await colorize(pendingPhotos());
  }));
  $("pack").addEventListener("change", async () => { await importPack($("pack").files[0]); $("pack").value = ""; });
  $("download-all").addEventListener("click", downloadAll);
  $("clear-photos").addEventListener("click", clearPhotos);
  await guard(async () => {
    const s = await api("/api/status");
    state.usesMemory = s.uses_memory;
    const where = s.embedded ? "embedded memory server" : `memory server ${s.endpoint}`;
    $("model").textContent = `${s.checkpoint} · ${s.image_size} px model · ${where} · ${s.device}`;
    await loadMemories(s.default_memory);
    await loadSlots();
  });
  document.body.dataset.ready = "1";
}

start();
