"""The report of ``mmrole eval converse``: per model the score by turn index (drift, with intervals), last third vs
first third of the turns, repetition (n-gram overlap between the agent's own turns), whole-conversation scores and
pairwise win rates; Markdown, CSV, JSON and plots. Pure: no Ray, no model.

Scores are the judge's 1-10 absolute scores (failures excluded and counted, never zeros); a turn's score is the
mean of its parsed metrics. Intervals are seeded percentile bootstraps over conversations (the unit that is
sampled), 95%.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .contract import JudgeResult, Key
from .converse import Conversation, agent_turns
from .converse_stats import Estimate, mean_or_none, repetition_by_turn

Results = Mapping[Key, JudgeResult]


# ------------------------------------------------------------------------------------------------ report
@dataclass
class PairwiseStat:
    a: str
    b: str
    level: str  # "turn" | "conversation"
    wins: int
    ties: int
    losses: int
    failed: int
    win_rate: Estimate  # of a over b: (wins + ties / 2) / n, bootstrap over conversations

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("a", "b", "level", "wins", "ties", "losses", "failed")}
        d["win_rate"] = self.win_rate.to_dict()
        return d


@dataclass
class ModelConverse:
    model: str
    conversations: int
    complete: int
    ended_early: dict  # reason -> count
    turns_mean: Optional[float]
    by_turn: list  # [Estimate] per agent turn index
    by_turn_metric: dict  # metric -> [mean or None] per turn index
    drift: Estimate  # last third - first third of the turns (per conversation)
    drift_by_metric: dict  # metric -> Estimate
    repetition: Estimate  # per conversation: mean share of repeated n-grams
    repetition_by_turn: list  # [Estimate] per turn index (from 1)
    conversation_scores: dict  # metric -> Estimate
    conversation_overall: Estimate
    judged: dict = field(default_factory=dict)  # turns / conversation: {parsed, failed}

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "conversations": self.conversations,
            "complete": self.complete,
            "ended_early": self.ended_early,
            "turns_mean": self.turns_mean,
            "by_turn": [e.to_dict() for e in self.by_turn],
            "by_turn_metric": self.by_turn_metric,
            "drift": self.drift.to_dict(),
            "drift_by_metric": {m: e.to_dict() for m, e in self.drift_by_metric.items()},
            "repetition": self.repetition.to_dict(),
            "repetition_by_turn": [e.to_dict() for e in self.repetition_by_turn],
            "conversation_scores": {m: e.to_dict() for m, e in self.conversation_scores.items()},
            "conversation_overall": self.conversation_overall.to_dict(),
            "judged": self.judged,
        }


@dataclass
class ConverseReport:
    turns: int
    repetition_n: int
    models: list  # [ModelConverse]
    pairwise: list  # [PairwiseStat]
    per_conversation: list  # dict rows

    def to_dict(self) -> dict:
        return {
            "turns": self.turns,
            "repetition_n": self.repetition_n,
            "models": [m.to_dict() for m in self.models],
            "pairwise": [p.to_dict() for p in self.pairwise],
            "conversations": self.per_conversation,
        }


def _turn_scores(conv: Conversation, results: Results) -> dict[int, dict[str, float]]:
    """{agent turn: {metric: score}} of the parsed judgements of one conversation."""
    out: dict[int, dict[str, float]] = {}
    for t in agent_turns(conv):
        sid = f"{conv.item.id}#t{t.agent_turn}"
        out[t.agent_turn] = {m: r.score_a for (s, m), r in results.items() if s == sid and r.ok}
    return out


def _thirds(n: int) -> tuple[range, range]:
    k = max(1, n // 3)
    return range(0, k), range(n - k, n)


def build_converse_report(
    conversations: Mapping[str, Sequence[Conversation]],
    turn_results: Mapping[str, Results],
    conversation_results: Mapping[str, Results],
    pairwise: Mapping[tuple[str, str], Mapping[str, Results]],
    *,
    turns: int,
    bootstrap: int = 1000,
    seed: int = 0,
    repetition_n: int = 3,
) -> ConverseReport:
    """Everything of the report from the conversations and the judgements (each keyed (sample id, metric))."""
    models, rows = [], []
    for mi, (model, convs) in enumerate(conversations.items()):
        tr = turn_results.get(model, {})
        cr = conversation_results.get(model, {})
        by_conv = {}
        for (sid, m), r in tr.items():
            by_conv.setdefault(sid.split("#t", 1)[0], {})[(sid, m)] = r
        per_turn: dict[int, list[float]] = {}
        per_turn_metric: dict[str, dict[int, list[float]]] = {}
        drifts, drift_metric, reps = [], {}, []
        rep_turn: dict[int, list[float]] = {}
        conv_metric: dict[str, list[float]] = {}
        conv_overall = []
        for c in convs:
            scores = _turn_scores(c, by_conv.get(c.item.id, {}))
            turn_means = {j: mean_or_none(list(v.values())) for j, v in scores.items()}
            for j, v in turn_means.items():
                if v is not None:
                    per_turn.setdefault(j, []).append(v)
                for m, x in scores[j].items():
                    per_turn_metric.setdefault(m, {}).setdefault(j, []).append(x)
            n = len(scores)
            drift = None
            if n >= 2:
                first, last = _thirds(n)
                f = [turn_means[j] for j in first if turn_means.get(j) is not None]
                la = [turn_means[j] for j in last if turn_means.get(j) is not None]
                if f and la:
                    drift = mean_or_none(la) - mean_or_none(f)
                    drifts.append(drift)
                for m in {m for v in scores.values() for m in v}:
                    fm = [scores[j][m] for j in first if m in scores[j]]
                    lm = [scores[j][m] for j in last if m in scores[j]]
                    if fm and lm:
                        drift_metric.setdefault(m, []).append(mean_or_none(lm) - mean_or_none(fm))
            rt = repetition_by_turn([t.text for t in agent_turns(c)], repetition_n)
            vals = [x for x in rt if x is not None]
            for j, x in enumerate(rt):
                if x is not None:
                    rep_turn.setdefault(j, []).append(x)
            rep = mean_or_none(vals)
            if rep is not None:
                reps.append(rep)
            cs = {m: r.score_a for (s, m), r in cr.items() if s == c.item.id and r.ok}
            for m, x in cs.items():
                conv_metric.setdefault(m, []).append(x)
            co = mean_or_none(list(cs.values()))
            if co is not None:
                conv_overall.append(co)
            rows.append(
                {
                    "model": model,
                    "conversation": c.item.id,
                    "type": c.item.dialogue_type,
                    "role": c.item.role,
                    "partner": c.item.partner or "human",
                    "agent_turns": c.agent_turns,
                    "ended": c.ended,
                    "turn_score_mean": mean_or_none([v for v in turn_means.values() if v is not None]),
                    "conversation_score": co,
                    "drift": drift,
                    "repetition": rep,
                }
            )
        s = seed + 7919 * mi
        n_turns = max([turns, *per_turn.keys()]) if per_turn else turns
        ended: dict[str, int] = {}
        for c in convs:
            if c.ended:
                ended[c.ended.split(":")[0]] = ended.get(c.ended.split(":")[0], 0) + 1
        models.append(
            ModelConverse(
                model=model,
                conversations=len(convs),
                complete=sum(c.agent_turns >= turns for c in convs),
                ended_early=ended,
                turns_mean=mean_or_none([c.agent_turns for c in convs]),
                by_turn=[Estimate.of(per_turn.get(j, []), bootstrap, s + j) for j in range(n_turns)],
                by_turn_metric={
                    m: [mean_or_none(v.get(j, [])) for j in range(n_turns)] for m, v in sorted(per_turn_metric.items())
                },
                drift=Estimate.of(drifts, bootstrap, s + 101),
                drift_by_metric={m: Estimate.of(v, bootstrap, s + 103) for m, v in sorted(drift_metric.items())},
                repetition=Estimate.of(reps, bootstrap, s + 107),
                repetition_by_turn=[Estimate.of(rep_turn.get(j, []), bootstrap, s + 200 + j) for j in range(n_turns)],
                conversation_scores={m: Estimate.of(v, bootstrap, s + 109) for m, v in conv_metric.items()},
                conversation_overall=Estimate.of(conv_overall, bootstrap, s + 113),
                judged={
                    "turns": {"parsed": sum(r.ok for r in tr.values()), "failed": sum(not r.ok for r in tr.values())},
                    "conversation": {
                        "parsed": sum(r.ok for r in cr.values()),
                        "failed": sum(not r.ok for r in cr.values()),
                    },
                },
            )
        )
    pw = []
    for pi, ((a, b), levels) in enumerate(pairwise.items()):
        for level, results in levels.items():
            per_conv: dict[str, list[float]] = {}
            wins = ties = losses = failed = 0
            for (sid, _), r in results.items():
                if not r.ok:
                    failed += 1
                    continue
                x = 1.0 if r.score_a > r.score_b else 0.5 if r.score_a == r.score_b else 0.0
                wins, ties, losses = wins + (x == 1.0), ties + (x == 0.5), losses + (x == 0.0)
                per_conv.setdefault(sid.split("#t", 1)[0], []).append(x)
            n = wins + ties + losses
            rate = (wins + ties / 2) / n if n else None
            ci = None
            if len(per_conv) >= 2 and bootstrap > 0:  # clustered: resample conversations, pool their judgements
                import numpy as np

                rng = np.random.default_rng(seed + 31 * pi + len(level))
                groups = list(per_conv.values())
                boots = []
                for _ in range(bootstrap):
                    pick = rng.integers(0, len(groups), size=len(groups))
                    xs = [x for g in pick for x in groups[g]]
                    boots.append(sum(xs) / len(xs))
                ci = (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))
            pw.append(PairwiseStat(a, b, level, wins, ties, losses, failed, Estimate(rate, n, ci)))
    return ConverseReport(turns, repetition_n, models, pw, rows)


# ------------------------------------------------------------------------------------------------ output
def render_converse_markdown(rep: ConverseReport) -> str:
    lines = [f"# Whole-conversation evaluation ({rep.turns} agent turns per conversation)", ""]
    lines += [
        "Scores: the judge's absolute 1-10 per agent turn (mean of the parsed metrics) and per conversation; "
        "intervals: 95% bootstrap over conversations. Drift = mean of the last third of the turns minus the first "
        f"third. Repetition = share of an agent turn's word {rep.repetition_n}-grams already in its earlier turns.",
        "",
        "| model | conversations | complete | ended early | mean turns | turn score | drift | repetition "
        "| conversation score | judged turns (parsed/failed) |",
        "| --- | ---: | ---: | --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for m in rep.models:
        allturn = [e.mean for e in m.by_turn if e.mean is not None]
        ts = f"{sum(allturn) / len(allturn):.2f}" if allturn else "n/a"
        ended = ", ".join(f"{k}: {v}" for k, v in m.ended_early.items()) or "0"
        j = m.judged["turns"]
        lines.append(
            f"| {m.model} | {m.conversations} | {m.complete} | {ended} | "
            f"{m.turns_mean if m.turns_mean is None else round(m.turns_mean, 2)} | {ts} | {m.drift.fmt()} | "
            f"{m.repetition.fmt(3)} | {m.conversation_overall.fmt()} | {j['parsed']}/{j['failed']} |"
        )
    lines += ["", "## Score by turn index", ""]
    n = max((len(m.by_turn) for m in rep.models), default=0)
    lines.append("| model | " + " | ".join(f"turn {j + 1}" for j in range(n)) + " |")
    lines.append("| --- |" + " --- |" * n)
    for m in rep.models:
        lines.append(f"| {m.model} | " + " | ".join(e.fmt() for e in m.by_turn) + " |")
    lines += ["", "## Whole-conversation scores", ""]
    metrics = sorted({k for m in rep.models for k in m.conversation_scores})
    if metrics:
        lines.append("| model | " + " | ".join(metrics) + " |")
        lines.append("| --- |" + " --- |" * len(metrics))
        for m in rep.models:
            lines.append(
                f"| {m.model} | "
                + " | ".join(m.conversation_scores[k].fmt() if k in m.conversation_scores else "n/a" for k in metrics)
                + " |"
            )
    else:
        lines.append("No whole-conversation score parsed.")
    if rep.pairwise:
        lines += ["", "## Pairwise (same partner turns)", ""]
        lines.append("| A | B | level | A wins | ties | B wins | failed | A's win rate |")
        lines.append("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
        for p in rep.pairwise:
            lines.append(
                f"| {p.a} | {p.b} | {p.level} | {p.wins} | {p.ties} | {p.losses} | {p.failed} | {p.win_rate.fmt(3)} |"
            )
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _ci(e: Estimate, i: int):
    return e.ci[i] if e.ci else None


def write_converse_report(rep: ConverseReport, out: Path, plots: bool = True) -> list[Path]:
    """converse_report.md/.json, by_turn.csv, drift.csv, pairwise.csv, conversations.csv and, with matplotlib,
    score_by_turn.png (drift lines with intervals) and drift.png (last third vs first third)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "converse_report.md", out / "converse_report.json"]
    paths[0].write_text(render_converse_markdown(rep), encoding="utf-8")
    paths[1].write_text(json.dumps(rep.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    by_turn = [
        {
            "model": m.model,
            "turn": j + 1,
            "score": e.mean,
            "ci_low": _ci(e, 0),
            "ci_high": _ci(e, 1),
            "n": e.n,
            "repetition": m.repetition_by_turn[j].mean,
        }
        for m in rep.models
        for j, e in enumerate(m.by_turn)
    ]
    drift = [
        {"model": m.model, "metric": metric, "drift": e.mean, "ci_low": _ci(e, 0), "ci_high": _ci(e, 1), "n": e.n}
        for m in rep.models
        for metric, e in [("overall", m.drift), *m.drift_by_metric.items()]
    ]
    pairwise = [
        {
            **{k: v for k, v in p.to_dict().items() if k != "win_rate"},
            "win_rate": p.win_rate.mean,
            "ci_low": _ci(p.win_rate, 0),
            "ci_high": _ci(p.win_rate, 1),
        }
        for p in rep.pairwise
    ]
    for name, rows in (
        ("by_turn.csv", by_turn),
        ("drift.csv", drift),
        ("pairwise.csv", pairwise),
        ("conversations.csv", rep.per_conversation),
    ):
        _write_csv(out / name, rows)
        paths.append(out / name)
    if plots:
        paths += _plots(rep, out)
    return paths


def _plots(rep: ConverseReport, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = "osD^vP*X"
    for i, m in enumerate(rep.models):
        xs = [j + 1 for j, e in enumerate(m.by_turn) if e.mean is not None]
        ys = [e.mean for e in m.by_turn if e.mean is not None]
        line = ax.plot(xs, ys, marker=markers[i % len(markers)], label=m.model)[0]
        lo = [e.ci[0] if e.ci else e.mean for e in m.by_turn if e.mean is not None]
        hi = [e.ci[1] if e.ci else e.mean for e in m.by_turn if e.mean is not None]
        if xs:
            ax.fill_between(xs, lo, hi, alpha=0.18, color=line.get_color())
    ax.set_xlabel("agent turn")
    ax.set_ylabel("judge score (1-10), mean with 95% CI")
    ax.set_title("Score by turn index (drift)")
    ax.set_xticks(range(1, rep.turns + 1))
    ax.grid(alpha=0.3)
    if rep.models:
        ax.legend()
    fig.tight_layout()
    paths.append(out / "score_by_turn.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = [m.model for m in rep.models]
    vals = [m.drift.mean if m.drift.mean is not None else 0.0 for m in rep.models]
    err_lo = [v - m.drift.ci[0] if m.drift.ci else 0.0 for v, m in zip(vals, rep.models)]
    err_hi = [m.drift.ci[1] - v if m.drift.ci else 0.0 for v, m in zip(vals, rep.models)]
    ax.bar(
        names, vals, yerr=[err_lo, err_hi], capsize=6, color=["#4C72B0", "#DD8452", "#55A868", "#C44E52"][: len(names)]
    )
    ax.axhline(0, color="black", lw=0.8)
    for x, m in enumerate(rep.models):
        if m.drift.mean is None:
            ax.annotate("n/a", (x, 0), ha="center", va="bottom")
    ax.set_ylabel("last third - first third of turns")
    ax.set_title("Drift (negative: the character gets worse as the conversation goes on)")
    fig.tight_layout()
    paths.append(out / "drift.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
