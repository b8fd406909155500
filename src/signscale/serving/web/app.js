// The page to try a model: pick or drop an image, POST it to /v1/classify (or /v1/detect for a
// scene), show the top-5 with pictograms, or the scene with its boxes. No build step, no library.
"use strict";

const $ = (id) => document.getElementById(id);
const results = $("results");
const canvas = $("preview");

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function loadModel() {
  try {
    const r = await fetch("/v1/model");
    const m = await r.json();
    if (!r.ok) throw new Error(m.error ? m.error.message : r.statusText);
    $("model").textContent = `model ${m.version} · ${m.architecture} · ${m.num_classes} classes (${m.label_space.name})` +
      ` · input ${m.preprocess.image_size}px · ${m.backend}`;
    $("mode-detect").disabled = !m.detector;
  } catch (e) {
    $("model").textContent = "model information unavailable: " + e.message;
  }
}

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function showError(message) {
  results.dataset.state = "error";
  results.innerHTML = `<p class="error">${escapeHtml(message)}</p>`;
}

function row(label, probability) {
  const pct = (100 * probability).toFixed(1);
  return `<div class="prediction" data-key="${escapeHtml(label.key)}">
      <img alt="" src="/v1/pictogram/${encodeURIComponent(label.key)}.png" onerror="this.style.visibility='hidden'">
      <div><div class="name">${escapeHtml(label.name)}</div>
           <div class="key">${escapeHtml(label.key)} · ${escapeHtml(label.country)}</div>
           <div class="bar"><div style="width:${pct}%"></div></div></div>
      <div class="prob">${pct}%</div></div>`;
}

async function drawPreview(file) {
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, 360 / Math.max(bitmap.width, bitmap.height));
  const small = Math.max(bitmap.width, bitmap.height) < 120;  // enlarge tiny sign crops
  const k = small ? 120 / Math.max(bitmap.width, bitmap.height) : scale;
  canvas.width = Math.round(bitmap.width * k);
  canvas.height = Math.round(bitmap.height * k);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = !small;
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  return k;
}

function drawBoxes(boxes, k) {
  const ctx = canvas.getContext("2d");
  ctx.lineWidth = 2;
  ctx.font = "12px system-ui";
  for (const b of boxes) {
    const [x1, y1, x2, y2] = b.box.map((v) => v * k);
    ctx.strokeStyle = "#ffd400";
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${b.name || b.key} ${(100 * (b.confidence ?? b.score)).toFixed(0)}%`;
    ctx.fillStyle = "rgba(0,0,0,.7)";
    ctx.fillRect(x1, Math.max(0, y1 - 15), ctx.measureText(text).width + 6, 15);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x1 + 3, Math.max(11, y1 - 3));
  }
}

async function send(file) {
  results.dataset.state = "busy";
  results.innerHTML = "<p>asking the model&hellip;</p>";
  let k = 1;
  try {
    k = await drawPreview(file);
  } catch (e) {
    // the browser cannot show it; the service will say what is wrong with it
  }
  const body = new FormData();
  body.append("file", file, file.name);
  const endpoint = mode() === "detect" ? "/v1/detect" : "/v1/classify";
  // the page's own ?min_confidence=0.9 is passed on: below it the service answers "unsure"
  const minConfidence = new URLSearchParams(location.search).get("min_confidence");
  const query = minConfidence === null ? "" : "?min_confidence=" + encodeURIComponent(minConfidence);
  let r, data;
  try {
    r = await fetch(endpoint + query, { method: "POST", body });
    data = await r.json();
  } catch (e) {
    return showError("the service did not answer: " + e.message);
  }
  if (!r.ok) return showError(data.error ? `${data.error.reason}: ${data.error.message}` : r.statusText);
  if (endpoint === "/v1/detect") {
    drawBoxes(data.boxes, k);
    results.innerHTML = data.boxes.length
      ? data.boxes.map((b) => row(b, b.confidence ?? b.score)).join("")
      : "<p>no sign found in this scene</p>";
  } else {
    const answer = data.results[0];
    const unsure = answer.unsure
      ? `<p class="unsure">unsure: the top answer is below the minimum confidence of ` +
        `${(100 * data.min_confidence).toFixed(0)}%, so the model does not name this sign; its guesses follow</p>`
      : "";
    results.innerHTML = unsure + answer.top_k.map((t) => row(t, t.probability)).join("");
  }
  results.dataset.state = "done";
}

$("file").addEventListener("change", (e) => { if (e.target.files.length) send(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]);
});
loadModel();
