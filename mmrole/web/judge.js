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

setupToken(loadJudgeLimits);
wireDropZone($("drop"), $("file"), onJudgeFile);
$("score-form").addEventListener("submit", score);
loadJudgeLimits();
