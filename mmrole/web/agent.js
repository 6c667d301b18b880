// The agent page: pick a character, an image, then talk (streamed role-play turns via POST /v1/roleplay).
"use strict";

const state = { characters: [], character: null, image: null, imageInfo: null, history: [], limits: null, busy: false, abort: null };

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function bubble(speaker, text, cls) {
  const body = el("div", { class: "text" }, text || "");
  const b = el("div", { class: "msg " + (cls || "") }, el("div", { class: "who" }, speaker), body);
  $("log").append(b);
  $("log").scrollTop = $("log").scrollHeight;
  return body;
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy; $("run-inter").disabled = busy; $("stop").disabled = !busy;
}

function showError(id, e) { $(id).textContent = e ? (e.message || String(e)) + (e.param ? ` (field: ${e.param})` : "") : ""; }

async function loadCharacters() {
  try {
    const data = (await getJSON("v1/characters?profile=true")).data;
    state.characters = data;
    renderCharacters();
    const other = $("other"); other.innerHTML = "";
    for (const c of data) other.append(el("option", { value: c.name }, c.name));
    if (data.length > 1) other.value = data[1].name;
  } catch (e) { showError("chat-error", e); }
}

function renderCharacters() {
  const q = $("char-search").value.trim().toLowerCase();
  const list = $("char-list"); list.innerHTML = "";
  for (const c of state.characters) {
    if (q && !(c.name.toLowerCase().includes(q) || (c.script || "").toLowerCase().includes(q))) continue;
    const li = el("li", { class: state.character && state.character.name === c.name ? "sel" : "", "data-name": c.name, tabindex: "0",
      onclick: () => chooseCharacter(c) }, el("strong", {}, c.name), el("span", { class: "muted" }, " " + (c.script || "")));
    list.append(li);
  }
  if (!list.children.length) list.append(el("li", { class: "muted" }, state.characters.length ? "no match" : "this server has no dataset loaded"));
}

function chooseCharacter(c) {
  state.character = c;
  renderCharacters();
  const p = $("profile"); p.innerHTML = "";
  p.append(el("h3", {}, c.name), el("p", { class: "muted" }, [c.script, c.kind, c.language].filter(Boolean).join(" · ")),
    el("pre", {}, c.profile || ""));
  $("chat-title").textContent = "Conversation with " + c.name;
  reset();
}

async function loadImages() {
  try {
    const data = (await getJSON("v1/images")).data;
    const grid = $("image-grid"); grid.innerHTML = "";
    for (const im of data.slice(0, 60)) {
      grid.append(el("img", { src: "v1/images/" + encodeURI(im.path), alt: im.path, title: im.scene_info || im.path, loading: "lazy",
        onclick: () => pickDatasetImage(im) }));
    }
    if (!data.length) $("dataset-images").hidden = true;
  } catch (e) { $("dataset-images").hidden = true; }
}

async function pickDatasetImage(im) {
  showError("image-error", null);
  try {
    const resp = await api("v1/images/" + encodeURI(im.path));
    setImage(await blobToDataURL(await resp.blob()), { role_info: im.role_info, place_info: im.place_info, scene_info: im.scene_info });
  } catch (e) { showError("image-error", e); }
}

function setImage(url, info) {
  state.image = url;
  state.imageInfo = info || null;
  const p = $("preview"); p.src = url; p.hidden = false;
  reset();
}

async function onFile(file) {
  showError("image-error", null);
  try { setImage(await checkedImage(file, state.limits), null); } catch (e) { showError("image-error", e); }
}

function reset() {
  if (state.abort) state.abort.abort();
  state.history = [];
  $("log").innerHTML = "";
  showError("chat-error", null);
}

function roleplayBody(character, other, message) {
  const body = { character: character, other: other || "human", image: state.image, history: state.history.slice(), stream: true };
  if (message) body.message = message;
  if (state.imageInfo) {
    const info = {};
    for (const k of ["role_info", "place_info", "scene_info"]) if (state.imageInfo[k]) info[k] = state.imageInfo[k];
    body.image_info = info;
  }
  return body;
}

function ready() {
  if (!state.character) { showError("chat-error", new Error("Pick a character first.")); return false; }
  if (!state.image) { showError("chat-error", new Error("Upload or pick an image first.")); return false; }
  return true;
}

// One streamed turn: the reply grows in its bubble as chunks arrive. Returns the whole reply.
async function streamTurn(speaker, body) {
  const target = bubble(speaker, "", "bot streaming");
  let text = "";
  state.abort = new AbortController();
  try {
    await postStream("v1/roleplay", body, (ev) => {
      if (ev.object === "roleplay.chunk") { text += ev.delta; target.textContent = text; }
      else if (ev.object === "roleplay.reply") { text = ev.reply; target.textContent = text; }
    }, state.abort.signal);
  } finally {
    target.parentElement.classList.remove("streaming");
    state.abort = null;
  }
  return text;
}

async function send(ev) {
  ev.preventDefault();
  if (state.busy || !ready()) return;
  showError("chat-error", null);
  const message = $("message").value.trim();
  setBusy(true);
  try {
    if (message) bubble("You", message, "me");
    const reply = await streamTurn(state.character.name, roleplayBody(state.character.name, null, message));
    if (message) state.history.push({ speaker: "human", text: message });
    state.history.push({ speaker: state.character.name, text: reply });
    $("message").value = "";
  } catch (e) { if (e.name !== "AbortError") showError("chat-error", e); } finally { setBusy(false); }
}

async function runInter() {
  if (state.busy || !ready()) return;
  const a = state.character.name, b = $("other").value;
  if (!b || b === a) { showError("chat-error", new Error("Pick a second, different character.")); return; }
  const n = Math.max(1, Math.min(20, parseInt($("turns").value, 10) || 4));
  reset();
  setBusy(true);
  try {
    const turns = [];
    for (let i = 0; i < n; i++) {
      const speaker = i % 2 === 0 ? a : b, other = i % 2 === 0 ? b : a;
      const last = turns.length ? turns[turns.length - 1] : null;
      state.history = turns.slice(0, Math.max(0, turns.length - 1));
      const reply = await streamTurn(speaker, roleplayBody(speaker, other, last ? last.text : null));
      turns.push({ speaker: speaker, text: reply });
    }
    state.history = turns;
  } catch (e) { if (e.name !== "AbortError") showError("chat-error", e); } finally { setBusy(false); }
}

function onMode() {
  const inter = mode() === "inter";
  $("inter-opts").hidden = !inter; $("run-inter").hidden = !inter;
  $("message").hidden = inter; $("send").hidden = inter;
  reset();
}

async function start() {
  setupToken(() => { loadCharacters(); loadImages(); loadLimits(); });
  wireDropZone($("drop"), $("file"), onFile);
  $("char-search").addEventListener("input", renderCharacters);
  $("send-form").addEventListener("submit", send);
  $("run-inter").addEventListener("click", runInter);
  $("stop").addEventListener("click", () => { if (state.abort) state.abort.abort(); });
  $("reset").addEventListener("click", reset);
  for (const r of document.querySelectorAll("input[name=mode]")) r.addEventListener("change", onMode);
  $("message").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) send(e); });
  await Promise.all([loadLimits(), loadCharacters(), loadImages()]);
}

async function loadLimits() { try { state.limits = await getJSON("v1/limits"); } catch (e) { /* 401: asked for a token */ } }

start();
