"""Judge agreement: two judges' score pairs on the same answers, per metric (how the paper validated its reward
model against GPT-4).

A judgement source is any of: an eval folder with ``<set>_reviews/<model>/<type>_test.json`` (published or ours),
a results store ``judge_results/<model>.jsonl``, or an ``RM_data`` JSON file (the review is the assistant turn;
the id is ``<model>/<sample id>::<metric>``, as written by ``jobs/build_rm_data.py``). Judgements are matched on
(model, sample id, metric).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .formats import EvalDataError, load_reviews_file, read_json_list
from .layout import discover
from .metrics import METRICS
from .parse import try_parse_scores
from .stats import pearson, spearman

Judgements = dict[tuple[str, str, str], tuple[float, float]]  # (model, sample id, metric) -> (A, B)


def load_judgements(path: Union[str, Path]) -> tuple[Judgements, int]:
    """The usable score pairs of a source, and how many judgements it held without one (failures)."""
    from .store import ResultsStore

    p = Path(path)
    out: Judgements = {}
    failed = 0
    if p.is_dir():
        files = discover(p, "reviews", "json")
        if not files:
            raise EvalDataError(f"{p}: no <set>_reviews/<model>/<type>_test.json files")
        for f in files:
            recs, _ = load_reviews_file(f.path, set_name=f.set_name, dialogue_type=f.dialogue_type)
            for rec in recs:
                for m, e in rec.reviews.items():
                    if e.score is None:
                        failed += 1
                    else:
                        out[(f.model, rec.id, m)] = e.score
        return out, failed
    if p.suffix == ".jsonl":
        model = p.name.split(".")[0]
        for r in ResultsStore(p).load().values():
            if r.ok:
                out[(model, r.sample_id, r.metric)] = (r.score_a, r.score_b)
            else:
                failed += 1
        return out, failed
    for i, rec in enumerate(read_json_list(p)):  # RM_data
        try:
            rid, review = rec["id"], rec["conversations"][1]["value"]
            prompt = rec["conversations"][0]["value"]
            head, metric = rid.rsplit("::", 1) if "::" in rid else (rid, "")
            model, sample = head.split("/", 1) if "/" in head else ("", head)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise EvalDataError(f"{p}: record #{i}: not an RM_data record ({e})") from e
        if metric not in METRICS:  # an id without ::<metric>: the metric the prompt names at a line start
            named = [m for m in METRICS if f"\n{m}:" in prompt]
            if len(named) != 1:
                raise EvalDataError(
                    f"{p}: record {rid!r}: id does not end in ::<metric> and the prompt names "
                    f"{'no metric' if not named else 'several metrics ' + str(named)}"
                )
            metric = named[0]
        pair, _ = try_parse_scores(review)
        if pair is None:
            failed += 1
        else:
            out[(model, sample, metric)] = pair
    return out, failed


@dataclass
class AgreementStat:
    metric: str
    n: int
    pearson: Optional[float]  # of the A/B ratios
    spearman: Optional[float]
    exact_a: Optional[float]  # share with the same score A
    exact_b: Optional[float]
    within1_a: Optional[float]  # share with |A1 - A2| <= 1
    within1_b: Optional[float]
    mean_abs_ratio_diff: Optional[float]

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _stat(metric: str, pairs: list[tuple[tuple[float, float], tuple[float, float]]]) -> AgreementStat:
    n = len(pairs)
    if not n:
        return AgreementStat(metric, 0, None, None, None, None, None, None, None)
    ra = [a[0] / a[1] for a, _ in pairs]
    rb = [b[0] / b[1] for _, b in pairs]
    return AgreementStat(
        metric,
        n,
        pearson(ra, rb),
        spearman(ra, rb),
        sum(a[0] == b[0] for a, b in pairs) / n,
        sum(a[1] == b[1] for a, b in pairs) / n,
        sum(abs(a[0] - b[0]) <= 1 for a, b in pairs) / n,
        sum(abs(a[1] - b[1]) <= 1 for a, b in pairs) / n,
        sum(abs(x - y) for x, y in zip(ra, rb)) / n,
    )


@dataclass
class Agreement:
    source_a: str
    source_b: str
    n_a: int
    n_b: int
    n_common: int
    failed_a: int
    failed_b: int
    stats: list[AgreementStat]  # per metric, then "all"
    points: dict  # metric -> [(ratio A, ratio B)] for the scatter plot

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("stats", "points")}
        d["metrics"] = [s.to_dict() for s in self.stats]
        return d


def compare(a: Judgements, b: Judgements, source_a: str = "A", source_b: str = "B", failed=(0, 0)) -> Agreement:
    """Agreement of two judgement sets on their common (model, sample, metric) keys. Keys of one source with
    an empty model match the other's by (sample, metric) when that is unambiguous."""
    b_by_sample = {}
    for (_, s, met), v in b.items():
        b_by_sample.setdefault((s, met), []).append(v)
    b_has_no_models = all(not k[0] for k in b)
    common = []
    for (m, s, met), va in a.items():
        vb = b.get((m, s, met))
        if vb is None and (not m or b_has_no_models):
            cands = b_by_sample.get((s, met), [])
            vb = cands[0] if len(cands) == 1 else None
        if vb is not None:
            common.append((met, va, vb))
    metrics = [m for m in METRICS if any(c[0] == m for c in common)]
    stats = [_stat(m, [(x, y) for met, x, y in common if met == m]) for m in metrics]
    stats.append(_stat("all", [(x, y) for _, x, y in common]))
    points = {m: [(x[0] / x[1], y[0] / y[1]) for met, x, y in common if met == m] for m in metrics}
    return Agreement(source_a, source_b, len(a), len(b), len(common), failed[0], failed[1], stats, points)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def render_agreement_markdown(ag: Agreement) -> str:
    lines = [
        f"Judge agreement: A = {ag.source_a} ({ag.n_a} scores, {ag.failed_a} failed), "
        f"B = {ag.source_b} ({ag.n_b} scores, {ag.failed_b} failed); {ag.n_common} in common.",
        "",
        "| Metric | N | Pearson (A/B) | Spearman (A/B) | exact A | exact B | within 1 A | within 1 B | MAD ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in ag.stats:
        cells = [s.metric, str(s.n)] + [
            _f(v)
            for v in (
                s.pearson,
                s.spearman,
                s.exact_a,
                s.exact_b,
                s.within1_a,
                s.within1_b,
                s.mean_abs_ratio_diff,
            )
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "A/B = the score of the answer under test over the reference's; 'exact A' compares the two"]
    lines[-1] += " judges' scores of the answer under test, 'exact B' of the reference."
    return "\n".join(lines) + "\n"


def write_agreement(ag: Agreement, out_dir: Union[str, Path], plots: bool = True) -> list[Path]:
    """``agreement.md``, ``agreement.csv``, ``agreement.json`` and (with matplotlib) ``agreement_scatter.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "agreement.md", out / "agreement.csv", out / "agreement.json"]
    paths[0].write_text(render_agreement_markdown(ag), encoding="utf-8")
    with open(paths[1], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(AgreementStat.__dataclass_fields__))
        w.writeheader()
        for s in ag.stats:
            w.writerow({k: ("" if v is None else v) for k, v in s.to_dict().items()})
    paths[2].write_text(json.dumps(ag.to_dict(), indent=2), encoding="utf-8")
    if plots:
        paths.append(plot_agreement(ag, out / "agreement_scatter.png"))
    return paths


def plot_agreement(ag: Agreement, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(ag.points)
    cols = 4
    rows = max(1, math.ceil(len(metrics) / cols))
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = ag.points[m]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.scatter(xs, ys, s=6, alpha=0.4)
        lo, hi = min(xs + ys + [1.0]), max(xs + ys + [1.0])
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
        st = next(s for s in ag.stats if s.metric == m)
        ax.set_title(f"{m}\nr={_f(st.pearson)} rho={_f(st.spearman)}", fontsize=8)
        ax.set_xlabel("A/B, judge A", fontsize=7)
        ax.set_ylabel("A/B, judge B", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
