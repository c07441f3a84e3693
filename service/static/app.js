// netvlad web page: search by photos, show results, add photos. Talks to the REST API of the same app.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, files: [], objectUrls: [], searchedUrls: [] };
const SVG = "http://www.w3.org/2000/svg";
const RERANK_LABELS = {
  none: "none", geometric: "geometric (local features)", patch: "patch (Patch-NetVLAD)", aqe: "query expansion (α-QE)",
};

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

// The re-ranking evidence of a result as a short line: inliers for geometric, a score otherwise.
function rerankText(rerank) {
  const score = rerank.method === "geometric" ? `${Math.round(rerank.score)} inliers` : rerank.score.toFixed(3);
  return `${rerank.method}: ${score}${rerank.verified ? " ✓" : ""}`;
}

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  return element;
}

// Width and height of a picture once it loads (when the server did not say).
async function naturalSize(url) {
  const img = new Image();
  img.src = url;
  await img.decode();
  return [img.naturalWidth, img.naturalHeight];
}

// The query photo (left) and the result's photo (right) side by side, a line between each pair of
// matched points. Points are pixels of the query photo as searched (query_size) and of the
// result's file at full size (width × height): both are scaled to the drawn size.
async function showMatches(result, queryUrl, hitSource) {
  const rerank = result.rerank;
  const view = $("matches-view");
  view.replaceChildren();
  view.removeAttribute("data-lines");
  $("matches-caption").textContent = "Loading…";
  const dialog = $("matches");
  if (!dialog.open) dialog.showModal();
  const hitUrl = await hitSource;
  const [qw, qh] = rerank.query_size || await naturalSize(queryUrl);
  const [cw, ch] = result.width && result.height ? [result.width, result.height] : await naturalSize(hitUrl);
  const height = 480, gap = 16;
  const wq = qw * height / qh, wc = cw * height / ch, x0 = wq + gap;
  view.setAttribute("viewBox", `0 0 ${wq + gap + wc} ${height}`);
  view.append(
    svgElement("image", { href: queryUrl, x: 0, y: 0, width: wq, height, preserveAspectRatio: "none" }),
    svgElement("image", { href: hitUrl, x: x0, y: 0, width: wc, height, preserveAspectRatio: "none" }),
  );
  const lines = svgElement("g", { class: "match-lines" });
  rerank.points.forEach(([xq, yq, xc, yc], i) => {
    const colour = `hsl(${Math.round(i * 137.5) % 360} 90% 55%)`;
    const x1 = xq * wq / qw, y1 = yq * height / qh, x2 = x0 + xc * wc / cw, y2 = yc * height / ch;
    lines.append(
      svgElement("line", { x1, y1, x2, y2, stroke: colour }),
      svgElement("circle", { cx: x1, cy: y1, r: 3, fill: colour }),
      svgElement("circle", { cx: x2, cy: y2, r: 3, fill: colour }),
    );
  });
  view.append(lines);
  view.setAttribute("data-lines", rerank.points.length);
  const name = result.name || (result.path || "").split("/").pop() || `image ${result.id}`;
  const parts = [`${rerank.points.length} matched points`, rerankText(rerank)];
  if (rerank.model) parts.push(`model: ${rerank.model}`);
  $("matches-caption").textContent =
    `Query photo ${rerank.query + 1} (left) and result #${result.rank}, ${name} (right): ${parts.join(" · ")}`;
}

async function renderResults(body, queryUrls) {
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
    const source = imageSource(result.file_url);
    source.then((src) => {
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
    if (result.rerank) {
      const evidence = document.createElement("span");
      evidence.className = "rerank" + (result.rerank.verified ? " verified" : "");
      evidence.textContent = rerankText(result.rerank);
      evidence.title = result.rerank.verified ? "re-ranked by its local evidence"
        : "too little local evidence: keeps its global order after the verified results";
      caption.append(evidence);
    }
    link.append(img, caption);
    item.append(link);
    if (result.rerank && result.rerank.points.length) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "matches-button";
      button.textContent = `Matches (${result.rerank.points.length})`;
      const queryUrl = queryUrls[result.rerank.query] || queryUrls[0];
      button.addEventListener("click", () => showMatches(result, queryUrl, source).catch((err) => {
        $("matches-caption").textContent = `Cannot show the matches: ${err.message}`;
      }));
      item.append(button);
    }
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
  form.append("rerank", $("rerank").value || "none");
  // The query photos as searched, for the matches view of these results (kept until the next search).
  const queryUrls = state.files.map((file) => URL.createObjectURL(file));
  $("search-button").disabled = true;
  show(message, "Searching…");
  try {
    const response = await fetch("v1/search", { method: "POST", body: form, headers: headers() });
    if (!response.ok) { show(message, await errorText(response), "error"); return; }
    const body = await response.json();
    state.searchedUrls.forEach(URL.revokeObjectURL);
    state.searchedUrls = queryUrls.splice(0);
    await renderResults(body, state.searchedUrls);
    const reranked = body.rerank && body.rerank !== "none" ? `, re-ranked: ${body.rerank} in ${Math.round(body.rerank_ms)} ms` : "";
    show(message, body.results.length
      ? `${body.results.length} results in ${Math.round(body.took_ms)} ms (${body.queries} photo${body.queries === 1 ? "" : "s"}, fusion: ${body.fusion}${reranked}).`
      : "The collection is empty: add photos first.", body.results.length ? "ok" : "");
  } catch (err) {
    show(message, `Cannot reach the service: ${err.message}`, "error");
  } finally {
    queryUrls.forEach(URL.revokeObjectURL);  // not kept: the search failed
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
    const rerank = $("rerank");
    if (!rerank.options.length) {
      for (const method of info.rerank_methods || ["none"])
        rerank.append(new Option(RERANK_LABELS[method] || method, method, method === "none", method === "none"));
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
$("matches-close").addEventListener("click", () => $("matches").close());
$("matches").addEventListener("click", (e) => { if (e.target === $("matches")) $("matches").close(); });
loadInfo();
