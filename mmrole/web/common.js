// Shared by the agent and judge pages: bearer token (kept in sessionStorage for this tab), JSON and SSE calls,
// image checks against the server's limits (the same limits the server enforces).
"use strict";

const TOKEN_KEY = "mmrole.token";
const ALLOWED_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"];

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  const t = sessionStorage.getItem(TOKEN_KEY);
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || ("HTTP " + status));
    this.status = status; this.param = err.param; this.code = err.code;
  }
}

async function readError(resp) {
  let body = null;
  try { body = await resp.json(); } catch (e) { body = { error: { message: resp.status + " " + resp.statusText } }; }
  return new ApiError(resp.status, body);
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  const base = opts.body ? { "Content-Type": "application/json" } : {};
  opts.headers = authHeaders(Object.assign(base, opts.headers || {}));
  const resp = await fetch(path, opts);
  if (resp.status === 401) showTokenBox(true);
  if (!resp.ok) throw await readError(resp);
  return resp;
}

async function getJSON(path) { return (await api(path)).json(); }

// POST body with stream: true; onEvent(obj) for each SSE data event until [DONE]. An error event throws.
async function postStream(path, body, onEvent, signal) {
  const resp = await api(path, { method: "POST", body: JSON.stringify(body), signal: signal });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(500, obj);
        onEvent(obj);
      }
    }
  }
}

function showTokenBox(needed) {
  const box = $("token-box");
  if (!box) return;
  box.hidden = false;
  if (needed) $("token-status").textContent = "This server needs an access token.";
}

function setupToken(onSaved) {
  const input = $("token"), status = $("token-status");
  if (sessionStorage.getItem(TOKEN_KEY)) status.textContent = "Token set for this tab.";
  $("token-save").addEventListener("click", () => {
    const v = input.value.trim();
    if (v) sessionStorage.setItem(TOKEN_KEY, v); else sessionStorage.removeItem(TOKEN_KEY);
    input.value = "";
    status.textContent = v ? "Token set for this tab." : "Token cleared.";
    if (onSaved) onSaved();
  });
}

function fileToDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(new Error("cannot read " + file.name));
    r.readAsDataURL(file);
  });
}

function imageSize(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve([img.naturalWidth, img.naturalHeight]);
    img.onerror = () => reject(new Error("not a readable image"));
    img.src = url;
  });
}

// A data: URL for an uploaded file, checked against the server's limits first (type, bytes, pixels, shape).
async function checkedImage(file, limits) {
  if (!ALLOWED_TYPES.includes(file.type)) throw new Error(`${file.name}: ${file.type || "unknown type"} is not accepted (PNG, JPEG, GIF, WebP, BMP)`);
  if (limits && file.size > limits.max_image_bytes) throw new Error(`${file.name}: ${file.size} bytes, above the limit of ${limits.max_image_bytes}`);
  const url = await fileToDataURL(file);
  const [w, h] = await imageSize(url);
  if (limits) {
    if (w > limits.max_image_side || h > limits.max_image_side || w * h > limits.max_image_pixels)
      throw new Error(`${file.name}: ${w}x${h} is above the limits (${limits.max_image_side} px a side, ${limits.max_image_pixels} pixels)`);
    if (Math.max(w, h) / Math.min(w, h) > limits.max_aspect_ratio) throw new Error(`${file.name}: aspect ratio ${w}x${h} is too extreme`);
  }
  return url;
}

async function blobToDataURL(blob) { return fileToDataURL(blob); }

function wireDropZone(zone, input, onFile) {
  zone.addEventListener("click", () => input.click());
  input.addEventListener("change", () => { if (input.files[0]) onFile(input.files[0]); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault(); zone.classList.remove("over");
    if (e.dataTransfer.files[0]) onFile(e.dataTransfer.files[0]);
  });
}
