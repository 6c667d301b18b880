// The judge page: POST /v1/score, then one pair of bars (answer, reference) per metric with its review.
"use strict";

const jstate = { image: null, limits: null };

async function onJudgeFile(file) {
  $("image-error").textContent = "";
  try {
    jstate.image = await checkedImage(file, jstate.limits);
    const p = $("preview"); p.src = jstate.image; p.hidden = false;
  } catch (e) { $("image-error").textContent = e.message; }
}

function bar(label, value, cls) {
  const pct = value === null || value === undefined ? 0 : Math.max(0, Math.min(100, value * 10));
  return el("div", { class: "bar-row" }, el("span", { class: "bar-label" }, label),
    el("span", { class: "bar" }, el("span", { class: "fill " + cls, style: `width:${pct}%` })),
    el("span", { class: "bar-value" }, value === null || value === undefined ? "n/a" : String(value)));
}

function showResults(out) {
  const box = $("results"); box.innerHTML = "";
  $("summary").textContent = `${out.parsed} of ${out.results.length} metrics parsed (judge: ${out.judge})`;
  for (const r of out.results) {
    const [a, b] = r.score || [null, null];
    box.append(el("div", { class: "metric " + (r.ok ? "ok" : "failed"), "data-metric": r.metric },
      el("h3", {}, r.metric, el("span", { class: "muted" }, r.ok ? `  ratio ${r.ratio.toFixed(2)}` : `  ${r.parse_status}`)),
      bar("answer", a, "a"), bar("reference", b, "b"),
      el("details", { open: "" }, el("summary", {}, "review"), el("pre", {}, r.review || r.error || ""))));
  }
}

async function score(ev) {
  ev.preventDefault();
  $("score-error").textContent = "";
  if (!jstate.image) { $("score-error").textContent = "Upload the image first."; return; }
  const body = { question: $("question").value, answer: $("answer").value, reference: $("reference").value, image: jstate.image };
  $("score").disabled = true; $("summary").textContent = "Scoring...";
  try {
    showResults(await (await api("v1/score", { method: "POST", body: JSON.stringify(body) })).json());
  } catch (e) {
    $("summary").textContent = "";
    $("score-error").textContent = e.message + (e.param ? ` (field: ${e.param})` : "");
  } finally { $("score").disabled = false; }
}

async function loadJudgeLimits() { try { jstate.limits = await getJSON("v1/limits"); } catch (e) { /* asked for a token */ } }

// Stored conversations (the app's converse_dir): pick one, see each turn with its per-metric scores.
function scoreText(v) { return v === null || v === undefined ? "n/a" : Number(v).toFixed(1); }

function showConversation(view) {
  const log = $("conv-log"); log.innerHTML = "";
  $("conv-summary").textContent = `${view.model} | ${view.conversation} | whole conversation: ${scoreText(view.conversation_mean)}`;
  for (const t of view.turns) {
    const agent = t.speaker === "agent";
    const box = el("div", { class: "msg " + (agent ? "" : "me"), "data-index": String(t.index) },
      el("div", { class: "who" }, t.name + (agent ? `  (turn ${t.agent_turn + 1}, score ${scoreText(t.mean)})` : "")),
      el("div", { class: "text" }, t.error ? `failed: ${t.error}` : t.text));
    if (agent && t.scores) {
      const rows = Object.entries(t.scores).map(([m, r]) => el("div", { class: "metric " + (r.ok ? "ok" : "failed"), "data-metric": m },
        bar(m, r.ok ? r.score : null, "a"), r.ok ? null : el("div", { class: "muted" }, r.error)));
      box.append(el("details", {}, el("summary", {}, "per-metric scores"), ...rows));
    }
    log.append(box);
  }
  const whole = Object.entries(view.conversation_scores || {});
  if (whole.length) {
    log.append(el("div", { class: "metric" }, el("h3", {}, "Whole conversation"),
      ...whole.map(([m, r]) => bar(m, r.ok ? r.score : null, "b"))));
  }
}

async function openConversation() {
  const v = $("conv-select").value; if (!v) return;
  const [model, id] = JSON.parse(v);
  $("conv-error").textContent = "";
  try {
    showConversation(await getJSON(`v1/conversation?model=${encodeURIComponent(model)}&id=${encodeURIComponent(id)}`));
  } catch (e) { $("conv-error").textContent = e.message; }
}

async function loadConversations() {
  let list;
  try { list = await getJSON("v1/conversations"); } catch (e) { return; } // none configured (404) or a token is asked for
  const sel = $("conv-select"); sel.innerHTML = "";
  for (const c of list.data) {
    sel.append(el("option", { value: JSON.stringify([c.model, c.conversation]) },
      `${c.model}: ${c.conversation} (${c.agent_turns} turns${c.failed ? ", ended on a failed turn" : ""})`));
  }
  $("conv-panel").hidden = list.data.length === 0;
  if (list.data.length) openConversation();
}

$("conv-select").addEventListener("change", openConversation);
setupToken(() => { loadJudgeLimits(); loadConversations(); });
wireDropZone($("drop"), $("file"), onJudgeFile);
$("score-form").addEventListener("submit", score);
loadJudgeLimits();
loadConversations();
