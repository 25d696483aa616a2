// detr-serve's page: one request per image at a low threshold, then the threshold slider and
// the class toggles filter and redraw here, without another request.
"use strict";

// The lowest threshold the slider offers: the page asks the server for everything above it.
const FETCH_THRESHOLD = 0.05;
const FETCH_MAX_DETECTIONS = 300;
// The canvas is drawn at most this many pixels on its longer side (a 40-megapixel photo
// would pass the browser's canvas limits at full size).
const CANVAS_MAX_SIDE = 1600;
// The same colours, by class id, as the server's renderer (app/images/render.py PALETTE).
const PALETTE = [
  [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
  [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
  [174, 199, 232], [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213],
  [196, 156, 148], [247, 182, 210], [199, 199, 199], [219, 219, 141], [158, 218, 229],
];

const $ = (id) => document.getElementById(id);
const state = {
  labels: {},        // class id -> name, from /v1/models
  hidden: new Set(), // class ids switched off
  result: null,      // the last /v1/detect result for the image shown
  picture: null,     // an HTMLImageElement, or null when the browser could not load the image
  busy: false,
  objectUrl: null,   // the object URL of the file shown
  file: null,        // the file chosen last (the Detect button runs it again)
  answered: 0,       // requests answered and shown (body[data-answered]: tests wait on it)
};

function colour(classId) {
  const [r, g, b] = PALETTE[classId % PALETTE.length];
  return `rgb(${r}, ${g}, ${b})`;
}

function textColour(classId) {
  const [r, g, b] = PALETTE[classId % PALETTE.length];
  return 0.299 * r + 0.587 * g + 0.114 * b > 150 ? "#000" : "#fff";
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showKeyField() {
  $("key-row").hidden = false;
}

// What to tell a person about an error answer: the status in words, then the API's message.
const STATUS_TEXT = {
  400: "The server could not use this input",
  401: "This server needs an API key: enter it above",
  403: "Refused",
  404: "Not found",
  413: "Too large",
  415: "Unsupported request",
  422: "Invalid request",
  429: "The server is busy",
  500: "Inference failed",
  503: "The service is unavailable (loading or shutting down)",
  504: "Timed out",
};

async function errorMessage(response) {
  let detail = "";
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    detail = typeof error === "string" ? error : (error && error.message) || body.detail || "";
  } catch (_) {
    detail = text.slice(0, 300);
  }
  const words = STATUS_TEXT[response.status] || `HTTP ${response.status}`;
  let message = `${words} (${response.status})`;
  if (detail) message += `: ${detail}`;
  const retry = response.headers.get("Retry-After");
  if (retry && (response.status === 429 || response.status === 503)) {
    message += ` Retry in ${retry} s.`;
  }
  return message;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setBusy(busy, what) {
  state.busy = busy;
  document.body.classList.toggle("busy", busy);
  $("detect-form").setAttribute("aria-busy", String(busy));
  $("detect").disabled = busy;
  $("file").disabled = busy;
  $("status").textContent = busy ? what : "";
}

async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders() });
  } catch (err) {
    $("model").textContent = `Could not reach the server: ${err.message}`;
    return;
  }
  if (response.status === 401) showKeyField();
  if (!response.ok) {
    $("model").textContent = await errorMessage(response);
    if (response.status === 503) setTimeout(loadModel, 2000);
    return;
  }
  // With several models the page runs the default one (requests without "model").
  const models = (await response.json()).models;
  const card = models.find((m) => m.default) || models[0];
  state.labels = Object.fromEntries(
    Object.entries(card.labels).map(([id, name]) => [Number(id), name]));
  $("model").textContent =
    `Model ${card.name} · ${card.backend} on ${card.device} (${card.dtype}) · ` +
    `${Object.keys(state.labels).length} classes`;
  buildClassToggles();
}

function buildClassToggles() {
  const box = $("classes");
  box.replaceChildren();
  for (const [id, name] of Object.entries(state.labels)) {
    const classId = Number(id);
    const label = document.createElement("label");
    const check = document.createElement("input");
    check.type = "checkbox";
    check.checked = !state.hidden.has(classId);
    check.dataset.classId = id;
    check.addEventListener("change", () => {
      if (check.checked) state.hidden.delete(classId); else state.hidden.add(classId);
      redraw();
    });
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour(classId);
    label.append(check, swatch, document.createTextNode(name));
    box.append(label);
  }
}

async function detect(body, headers) {
  setBusy(true, "Detecting…");
  showError("");
  try {
    const response = await fetch("/v1/detect", {
      method: "POST",
      headers: { ...authHeaders(), ...headers },
      body,
    });
    if (response.status === 401) showKeyField();
    if (!response.ok) {
      showError(await errorMessage(response));
      return null;
    }
    return (await response.json()).results[0];
  } catch (err) {
    // A server that refuses a large upload (413) may close the connection before the
    // browser has sent it all: the browser then reports a network error, not the answer.
    const size = body instanceof FormData ? body.get("file").size : body.length;
    const hint = size > 8e6
      ? ` (the request was ${(size / 1e6).toFixed(1)} MB: it may be over the server's limit)`
      : "";
    showError(`Could not reach the server: ${err.message}${hint}`);
    return null;
  } finally {
    setBusy(false);
  }
}

function loadPicture(src) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => resolve(null);
    img.src = src;
  });
}

async function detectFile(file) {
  if (!file || state.busy) return;
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("threshold", String(FETCH_THRESHOLD));
  form.append("max_detections", String(FETCH_MAX_DETECTIONS));
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  const url = URL.createObjectURL(file);
  state.objectUrl = url;
  const [result, picture] = await Promise.all([detect(form, {}), loadPicture(url)]);
  show(result, picture);
  document.body.dataset.answered = String(++state.answered);
}

async function detectUrl(url) {
  if (state.busy) return;
  const body = JSON.stringify({
    images: [{ url }],
    threshold: FETCH_THRESHOLD,
    max_detections: FETCH_MAX_DETECTIONS,
  });
  const [result, picture] = await Promise.all([
    detect(body, { "Content-Type": "application/json" }),
    loadPicture(url),
  ]);
  show(result, picture);
  document.body.dataset.answered = String(++state.answered);
}

function show(result, picture) {
  if (!result) return;
  state.result = result;
  state.picture = picture;
  for (const d of result.detections) {
    if (!(d.class_id in state.labels)) {
      state.labels[d.class_id] = d.label;
      buildClassToggles();
    }
  }
  $("filters").disabled = false;
  $("status").textContent = picture ? "" : "The browser could not load this image: boxes only.";
  showTimings(result.timings);
  redraw();
}

function visible() {
  const threshold = Number($("threshold").value);
  return state.result.detections.filter(
    (d) => d.score >= threshold && !state.hidden.has(d.class_id));
}

function redraw() {
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  if (!state.result) return;
  const { width, height } = state.result;
  const scale = Math.min(1, CANVAS_MAX_SIDE / Math.max(width, height));
  const canvas = $("canvas");
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  const ctx = canvas.getContext("2d");
  if (state.picture) {
    ctx.drawImage(state.picture, 0, 0, canvas.width, canvas.height);
  } else {
    ctx.fillStyle = "#e4e7ec";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  }
  const shown = visible();
  const short = Math.min(canvas.width, canvas.height);
  const line = Math.max(1, Math.round(short / 250));
  const fontSize = Math.max(10, Math.round(short / 36));
  ctx.font = `${fontSize}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  // Best last, so that it is drawn on top (as the server's renderer does).
  for (const d of [...shown].reverse()) {
    const [x1, y1, x2, y2] = d.box.map((v) => v * scale);
    ctx.strokeStyle = colour(d.class_id);
    ctx.lineWidth = line;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${d.label} ${d.score.toFixed(2)}`;
    const pad = line;
    const w = Math.min(ctx.measureText(text).width + 2 * pad, canvas.width);
    const h = Math.min(fontSize + 2 * pad, canvas.height);
    // Above the box when there is room, else inside its top; always inside the canvas.
    let top = y1 - h >= 0 ? y1 - h : Math.max(0, y1);
    top = Math.min(top, canvas.height - h);
    const left = Math.min(Math.max(0, x1), canvas.width - w);
    ctx.fillStyle = colour(d.class_id);
    ctx.fillRect(left, top, w, h);
    ctx.fillStyle = textColour(d.class_id);
    ctx.fillText(text, left + pad, top + pad);
  }
  canvas.dataset.boxes = String(shown.length);
  const threshold = Number($("threshold").value).toFixed(2);
  $("count").textContent =
    `${shown.length} of ${state.result.detections.length} detections shown ` +
    `(score ≥ ${threshold}; ${state.result.width}×${state.result.height} px)`;
  listDetections(shown);
}

function listDetections(shown) {
  const list = $("detections");
  list.replaceChildren();
  for (const d of shown) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colour(d.class_id);
    const box = d.box.map((v) => Math.round(v)).join(", ");
    item.append(swatch, document.createTextNode(` ${d.label} ${d.score.toFixed(3)} [${box}]`));
    list.append(item);
  }
}

function showTimings(timings) {
  const list = $("timings");
  list.replaceChildren();
  for (const [name, value] of Object.entries(timings || {})) {
    if (value === null || value === undefined) continue;
    const dt = document.createElement("dt");
    dt.textContent = name.replace(/_ms$/, "").replace(/_/g, " ");
    const dd = document.createElement("dd");
    dd.textContent = name.endsWith("_ms") ? `${Number(value).toFixed(1)} ms` : String(value);
    list.append(dt, dd);
  }
}

function init() {
  if (document.body.dataset.keyRequired === "true") showKeyField();
  $("api-key").value = sessionStorage.getItem("detr-serve-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("detr-serve-key", $("api-key").value.trim());
    showError("");
    loadModel();
  });
  $("file").addEventListener("change", () => {
    state.file = $("file").files[0] || state.file;
    $("file").value = ""; // choosing the same file again is a change too
    detectFile(state.file);
  });
  $("detect-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const url = $("url").value.trim();
    if (url) detectUrl(url);
    else if (state.file) detectFile(state.file);
    else showError("Choose an image file or enter an image URL first.");
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) {
      state.file = file;
      detectFile(file);
    }
  });
  $("threshold").addEventListener("input", redraw);
  loadModel();
}

init();
