// FIBER demo page: pick an image and a task, POST /api/predict, draw the result over the image.
// Plain JavaScript, no build step, no external resource.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990"];
const TEXT_HELP = {
  grounding: ["Caption; [brackets] mark phrases", "[a red circle] above [a blue square]"],
  detection: ["Class names (comma separated)", "red circle, blue square, green triangle"],
  vqa: ["Question", "what color is the circle?"],
  caption: ["(no text needed)", ""],
  scoring: ["Captions to score (one per line)", "a red circle\na blue square"],
};

const state = { info: null, image: null, result: null, downloadUrl: null };
const $ = (id) => document.getElementById(id);

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// A count in millions with two significant digits: 0.052, 1.2, 17.
function megs(n) {
  return String(Number((n / 1e6).toPrecision(2)));
}

function setStatus(message) {
  $("status").textContent = message;
}

async function fetchJson(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`the demo server did not answer (${err.message}); is it still running?`);
  }
  let payload = null;
  try {
    payload = await response.json();
  } catch (err) {
    payload = null;
  }
  if (!response.ok) {
    const msg = payload && payload.error ? payload.error : `HTTP ${response.status}`;
    throw new Error(msg);
  }
  return payload;
}

// ------------------------------------------------------------------------------------------ set-up

async function init() {
  try {
    state.info = await fetchJson("/api/info");
  } catch (err) {
    showError(`Cannot load the demo: ${err.message}`);
    return;
  }
  const info = state.info;
  const models = info.models.map((m) => `${m.task} (${m.path})`).join(", ");
  $("models").textContent = models ? `Models: ${models}` : "No model loaded.";
  if (info.training) {
    showTraining(info.training);
    setTimeout(pollTraining, 1000);
  }
  const lim = info.limits;
  $("limits").textContent = `PNG or JPEG, up to ${megs(lim.max_upload_bytes)} MB and ${megs(lim.max_pixels)} MP.`;
  const select = $("task");
  for (const t of info.tasks) {
    const opt = document.createElement("option");
    opt.value = t.task;
    opt.textContent = t.available ? t.label : `${t.label} (not available)`;
    select.appendChild(opt);
  }
  const firstAvailable = info.tasks.find((t) => t.available);
  if (firstAvailable) select.value = firstAvailable.task;
  select.addEventListener("change", onTaskChange);
  onTaskChange();
  const samples = $("samples");
  for (const s of info.samples) {
    const btn = document.createElement("button");
    btn.type = "button";
    btn.title = s.name;
    btn.dataset.index = String(s.index);
    const img = document.createElement("img");
    img.src = `/api/samples/${s.index}`;
    img.alt = s.name;
    btn.appendChild(img);
    btn.addEventListener("click", () => pickSample(s, btn));
    samples.appendChild(btn);
  }
  $("file").addEventListener("change", onFile);
  $("run").addEventListener("click", run);
  $("max-boxes").addEventListener("change", () => state.result && render(state.result));
  $("min-score").addEventListener("change", () => state.result && render(state.result));
  $("preview").addEventListener("load", layoutStage);
  $("preview").addEventListener("error", () => {
    $("preview").hidden = true;
    $("placeholder").hidden = false;
    $("placeholder").textContent = "The browser cannot display this file; the server will check it.";
  });
}

// First start without --checkpoint: the server trains the default models and reports the progress here.
function trainingText(t) {
  if (t.state === "loading") return "Default models trained; loading them…";
  if (!t.models) return "Preparing the synthetic world for the default models (first start only)…";
  const pct = t.steps ? Math.round((100 * t.step) / t.steps) : 0;
  return `Training the default models (first start only, cached afterwards): ${t.model} model ` +
    `${t.index} of ${t.models}, step ${t.step} of ${t.steps} (${pct}%)…`;
}

function showTraining(t) {
  $("models").textContent = trainingText(t);
  const bar = $("training");
  if (bar) {
    bar.hidden = false;
    bar.max = Math.max(1, t.models * t.steps);
    bar.value = t.models ? (t.index - 1) * t.steps + t.step : 0;
  }
}

async function pollTraining() {
  let info;
  try {
    info = await fetchJson("/api/info");
  } catch (err) {
    showError(err.message);
    setTimeout(pollTraining, 3000);
    return;
  }
  if (info.training) {
    showTraining(info.training);
    setTimeout(pollTraining, 1000);
  } else {
    window.location.reload(); // the models are loaded: start the page again with them
  }
}

function taskInfo(name) {
  return state.info.tasks.find((t) => t.task === name);
}

function onTaskChange() {
  const name = $("task").value;
  const t = taskInfo(name);
  const [label, example] = TEXT_HELP[name] || ["Text", ""];
  $("text-label").textContent = label;
  const text = $("text");
  text.placeholder = example;
  text.disabled = t ? !t.text_required : false;
  $("display").hidden = name !== "grounding" && name !== "detection";
  const note = $("task-note");
  note.hidden = !t || t.available;
  note.textContent = t && !t.available ? `Not available in this checkpoint: ${t.reason}` : "";
}

// -------------------------------------------------------------------------------------------- image

function clearResult() {
  state.result = null;
  $("overlay").replaceChildren();
  $("result").replaceChildren();
  $("raw-json").textContent = "";
  $("download").hidden = true;
  showError("");
}

function showImage(src) {
  clearResult();
  $("placeholder").hidden = true;
  const img = $("preview");
  img.hidden = false;
  img.src = src;
}

function pickSample(sample, button) {
  for (const b of document.querySelectorAll(".samples button")) b.classList.remove("selected");
  button.classList.add("selected");
  state.image = { sample: sample.index, name: sample.name };
  showImage(`/api/samples/${sample.index}`);
}

function onFile(event) {
  const file = event.target.files[0];
  if (!file) return;
  for (const b of document.querySelectorAll(".samples button")) b.classList.remove("selected");
  const limit = state.info.limits.max_upload_bytes;
  if (file.size > limit) {
    state.image = null;
    clearResult();
    showError(`${file.name}: the file is ${megs(file.size)} MB; images up to ${megs(limit)} MB are accepted.`);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = { data: reader.result, name: file.name };
    showImage(reader.result);
  };
  reader.onerror = () => showError(`${file.name}: the browser could not read the file.`);
  reader.readAsDataURL(file);
}

// Display size: small (synthetic 64 px) images are enlarged, large ones shrunk to fit 640 px.
function layoutStage() {
  const img = $("preview");
  const w = img.naturalWidth;
  const h = img.naturalHeight;
  if (!w || !h) return;
  const scale = Math.min(640 / Math.max(w, h), Math.max(1, 384 / Math.max(w, h)));
  img.style.width = `${Math.round(w * scale)}px`;
  img.style.height = `${Math.round(h * scale)}px`;
  const svg = $("overlay");
  svg.setAttribute("width", String(Math.round(w * scale)));
  svg.setAttribute("height", String(Math.round(h * scale)));
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  state.scale = scale;
}

// ---------------------------------------------------------------------------------------------- run

async function run() {
  showError("");
  if (!state.image) {
    showError("No image: upload one or pick a sample first.");
    return;
  }
  const task = $("task").value;
  const body = { task, text: $("text").disabled ? "" : $("text").value, filename: state.image.name };
  if (state.image.sample !== undefined) body.sample = state.image.sample;
  else body.image = state.image.data;
  const button = $("run");
  button.disabled = true;
  setStatus("Running…");
  try {
    const result = await fetchJson("/api/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    render(result);
    setStatus(`${taskInfo(task).label}: done in ${result.seconds.toFixed(2)} s.`);
  } catch (err) {
    clearResult();
    setStatus("");
    showError(err.message);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------------------------------- render

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

// A result table: the header row, then one body row per item, filled by fillRow(row, item, index).
function table(id, headers, items, fillRow) {
  const t = document.createElement("table");
  t.id = id;
  const head = t.createTHead().insertRow();
  for (const h of headers) {
    const th = document.createElement("th");
    th.textContent = h;
    head.appendChild(th);
  }
  const tbody = t.createTBody();
  items.forEach((item, i) => fillRow(tbody.insertRow(), item, i));
  return t;
}

function shownBoxes(result) {
  const maxBoxes = Math.max(1, parseInt($("max-boxes").value, 10) || 5);
  const minScore = parseFloat($("min-score").value) || 0;
  return result.boxes.filter((b) => b.score >= minScore).slice(0, maxBoxes);
}

function drawBoxes(result) {
  const svg = $("overlay");
  svg.replaceChildren();
  const boxes = shownBoxes(result);
  const fontSize = 12 / (state.scale || 1);
  boxes.forEach((b, i) => {
    const [x0, y0, x1, y1] = b.box;
    const color = COLORS[b.label % COLORS.length];
    const rect = document.createElementNS(SVG_NS, "rect");
    rect.setAttribute("class", "box");
    rect.setAttribute("x", String(x0));
    rect.setAttribute("y", String(y0));
    rect.setAttribute("width", String(Math.max(0, x1 - x0)));
    rect.setAttribute("height", String(Math.max(0, y1 - y0)));
    rect.setAttribute("stroke", color);
    // the best box (the answer of a referring expression) is drawn thicker
    rect.setAttribute("stroke-width", i === 0 ? "3" : "1.5");
    rect.setAttribute("vector-effect", "non-scaling-stroke");
    rect.dataset.rank = String(i);
    rect.dataset.score = String(b.score);
    rect.dataset.phrase = b.phrase;
    rect.dataset.box = JSON.stringify(b.box);
    svg.appendChild(rect);
    const label = document.createElementNS(SVG_NS, "text");
    label.setAttribute("class", "box-label");
    label.setAttribute("x", String(x0 + 1 / (state.scale || 1)));
    label.setAttribute("y", String(Math.max(y0 + fontSize, fontSize)));
    label.setAttribute("font-size", String(fontSize));
    label.setAttribute("stroke", color);
    // the outline is in image pixels: scale it like the font
    label.setAttribute("stroke-width", String(3 / (state.scale || 1)));
    label.textContent = `${b.phrase} ${b.score.toFixed(2)}`;
    svg.appendChild(label);
  });
  const out = $("result");
  const summary = document.createElement("p");
  summary.id = "box-summary";
  summary.textContent = `${result.boxes.length} boxes predicted; showing ${boxes.length}.`;
  out.appendChild(summary);
  const headers = ["#", "phrase", "score", "box (x0, y0, x1, y1)"];
  const t = table("boxes-table", headers, boxes, (row, b, i) => {
    const first = cell(row, String(i + 1));
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = COLORS[b.label % COLORS.length];
    first.prepend(sw);
    cell(row, b.phrase);
    cell(row, b.score.toFixed(3));
    cell(row, b.box.map((v) => v.toFixed(1)).join(", "));
  });
  out.appendChild(t);
}

function render(result) {
  state.result = result;
  $("overlay").replaceChildren();
  $("result").replaceChildren();
  const out = $("result");
  if (result.boxes) {
    drawBoxes(result);
  } else if (result.answers) {
    const t = table("answers-table", ["answer", "score", ""], result.answers, (row, a, i) => {
      if (i === 0) row.className = "best";
      cell(row, a.answer);
      cell(row, a.score.toFixed(3));
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.round(a.score * 120)}px`;
      cell(row, "").appendChild(bar);
    });
    out.appendChild(t);
  } else if (result.caption !== undefined) {
    const p = document.createElement("p");
    p.id = "caption-out";
    p.className = "caption-out";
    p.textContent = result.caption || "(empty caption)";
    out.appendChild(p);
  } else if (result.captions) {
    const headers = ["caption", "ITM probability", "ITC cosine"];
    const t = table("scores-table", headers, result.captions, (row, c, i) => {
      if (i === result.best) row.className = "best";
      cell(row, c.text);
      cell(row, c.itm.toFixed(3));
      cell(row, c.itc.toFixed(3));
    });
    out.appendChild(t);
  }
  const json = JSON.stringify(result, null, 2);
  $("raw-json").textContent = json;
  if (state.downloadUrl) URL.revokeObjectURL(state.downloadUrl);
  state.downloadUrl = URL.createObjectURL(new Blob([json], { type: "application/json" }));
  const link = $("download");
  link.href = state.downloadUrl;
  link.download = `fiber-demo-${result.task}.json`;
  link.hidden = false;
}

document.addEventListener("DOMContentLoaded", init);
