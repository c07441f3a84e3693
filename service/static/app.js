// netvlad web page: search by photos, show results, add photos. Talks to the REST API of the same app.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, files: [], objectUrls: [] };

function apiKey() { return $("api-key").value.trim(); }

function headers() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

function show(element, text, kind) {
  element.textContent = text;
  element.className = "message" + (kind ? " " + kind : "");
}

// The API answers errors as {"detail": "..."} (or a list of validation errors): one readable line.
async function errorText(response) {
  let detail = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (typeof body.detail === "string") detail = body.detail;
    else if (Array.isArray(body.detail)) detail = body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  } catch (_) { /* not JSON: keep the status text */ }
  return `Error ${response.status}: ${detail}`;
}

function formatBytes(n) {
  return n >= 1e6 ? (n / 1e6).toFixed(1) + " MB" : Math.round(n / 1e3) + " kB";
}

// Checks done before uploading, so obvious mistakes get an immediate message; the server checks again.
function checkFiles(files) {
  const limits = state.info;
  if (!files.length) return "Choose at least one photo.";
  if (limits && files.length > limits.max_query_images) return `At most ${limits.max_query_images} photos per search.`;
  for (const file of files) {
    if (file.type && !file.type.startsWith("image/")) return `${file.name} is not an image (${file.type}).`;
    if (limits && file.size > limits.max_upload_bytes)
      return `${file.name} is ${formatBytes(file.size)}; the limit is ${formatBytes(limits.max_upload_bytes)}.`;
  }
  return null;
}

function setQueryFiles(files) {
  state.files = Array.from(files);
  state.objectUrls.forEach(URL.revokeObjectURL);
  state.objectUrls = state.files.map((f) => URL.createObjectURL(f));
  $("query-previews").replaceChildren(...state.objectUrls.map((url, i) => {
    const img = document.createElement("img");
    img.src = url;
    img.alt = state.files[i].name;
    return img;
  }));
  $("query-names").textContent = state.files.map((f) => f.name).join(", ");
  $("search-button").disabled = !state.files.length || !state.info;
  show($("search-message"), "");
}

// Image files may need the API key (when reads are protected): fetch them with it and use blob URLs.
async function imageSource(url) {
  if (!state.info || !state.info.reads_need_key) return url;
  const response = await fetch(url, { headers: headers() });
  return response.ok ? URL.createObjectURL(await response.blob()) : "";
}

function formatLocation(loc) {
  const parts = [`${loc.lat.toFixed(5)}, ${loc.lon.toFixed(5)}`];
  parts.push(`± ${Math.round(loc.spread_m)} m`);
  parts.push(`from ${loc.support} result${loc.support === 1 ? "" : "s"} with coordinates`);
  return parts.join(" · ");
}

async function renderResults(body) {
  const list = $("results");
  list.replaceChildren();
  const location = $("location");
  if (body.location) {
    location.hidden = false;
    location.textContent = "Estimated location: " + formatLocation(body.location);
  } else {
    location.hidden = true;
  }
  for (const result of body.results) {
    const item = document.createElement("li");
    item.className = "result";
    const link = document.createElement("a");
    link.href = result.file_url;
    link.target = "_blank";
    link.rel = "noopener";
    const img = document.createElement("img");
    img.alt = result.name || `image ${result.id}`;
    img.loading = "lazy";
    imageSource(result.file_url).then((src) => {
      img.src = src;
      link.href = src;  // a blob URL when reads need the key, so the click opens the photo too
    });
    const caption = document.createElement("div");
    caption.className = "caption";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${result.rank} · ${result.score.toFixed(3)}`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = result.name || (result.path || "").split("/").pop() || `image ${result.id}`;
    name.title = result.path || "";
    caption.append(score, name);
    if (result.lat != null && result.lon != null) {
      const where = document.createElement("span");
      where.className = "muted";
      where.textContent = `${result.lat.toFixed(4)}, ${result.lon.toFixed(4)}`;
      caption.append(where);
    }
    link.append(img, caption);
    item.append(link);
    list.append(item);
  }
}

async function search(event) {
  event.preventDefault();
  const message = $("search-message");
  const problem = checkFiles(state.files);
  if (problem) { show(message, problem, "error"); return; }
  const form = new FormData();
  state.files.forEach((file) => form.append("images", file, file.name));
  form.append("top_k", $("top-k").value || "12");
  form.append("fusion", $("fusion").value);
  $("search-button").disabled = true;
  show(message, "Searching…");
  try {
    const response = await fetch("v1/search", { method: "POST", body: form, headers: headers() });
    if (!response.ok) { show(message, await errorText(response), "error"); return; }
    const body = await response.json();
    await renderResults(body);
    show(message, body.results.length
      ? `${body.results.length} results in ${Math.round(body.took_ms)} ms (${body.queries} photo${body.queries === 1 ? "" : "s"}, fusion: ${body.fusion}).`
      : "The collection is empty: add photos first.", body.results.length ? "ok" : "");
  } catch (err) {
    show(message, `Cannot reach the service: ${err.message}`, "error");
  } finally {
    $("search-button").disabled = !state.files.length;
  }
}

async function addImage(event) {
  event.preventDefault();
  const message = $("add-message");
  const file = $("add-file").files[0];
  const problem = checkFiles(file ? [file] : []);
  if (problem) { show(message, problem, "error"); return; }
  const form = new FormData();
  form.append("image", file, file.name);
  for (const field of ["name", "lat", "lon"]) {
    const value = $("add-" + field).value.trim();
    if (value) form.append(field, value);
  }
  show(message, "Adding…");
  try {
    const response = await fetch("v1/images", { method: "POST", body: form, headers: headers() });
    if (!response.ok) { show(message, await errorText(response), "error"); return; }
    const record = await response.json();
    show(message, `Added as image ${record.id}.`, "ok");
    $("add-form").reset();
    loadInfo();
  } catch (err) {
    show(message, `Cannot reach the service: ${err.message}`, "error");
  }
}

async function loadInfo() {
  try {
    const response = await fetch("v1/info", { headers: headers() });
    if (response.status === 401) {  // NETVLAD_PROTECT_STATUS: the description itself needs the key
      $("key-panel").hidden = false;
      show($("status"), "This service needs its API key: enter it above, then press Enter.", "error");
      return;
    }
    if (!response.ok) { show($("status"), await errorText(response), "error"); return; }
    const info = state.info = await response.json();
    $("status").textContent = `${info.count} photos indexed · model ${info.model} (${info.dim}-d)`;
    $("status").className = "muted";
    const fusion = $("fusion");
    if (!fusion.options.length) {
      for (const mode of info.fusion_modes) fusion.append(new Option(mode, mode, mode === info.default_fusion, mode === info.default_fusion));
    }
    $("top-k").max = info.max_top_k;
    $("add-panel").hidden = !info.writes_allowed;
    $("key-panel").hidden = !(info.writes_need_key || info.reads_need_key);
    if (info.reads_need_key) $("api-key").placeholder = "needed for searching and adding photos";
    $("search-button").disabled = !state.files.length;
  } catch (err) {
    show($("status"), `Cannot reach the service: ${err.message}`, "error");
  }
}

function setUpDropZone() {
  const zone = $("drop-zone");
  ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  }));
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
  }));
  zone.addEventListener("drop", (e) => setQueryFiles(e.dataTransfer.files));
  $("query-files").addEventListener("change", (e) => setQueryFiles(e.target.files));
}

setUpDropZone();
$("search-form").addEventListener("submit", search);
$("add-form").addEventListener("submit", addImage);
$("api-key").addEventListener("change", () => { if (!state.info) loadInfo(); });
loadInfo();
