"""``mmrole eval report``: tables, CSV/JSON and plots over a folder laid out like the published ``eval/``."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .aggregate import ALL, GroupStat, ScoreRow, per_sample_length_ratio, position_bias, rows_from_reviews, summarize
from .formats import EvalDataError, LoadStats, load_reviews_file, write_results_csv
from .judge_settings import read_judge_settings, render_judges
from .layout import discover, known_first
from .metrics import DIMENSIONS, METRICS, SETS
from .stats import length_bias

# Short column names for the Markdown table (the CSV/JSON keep the exact metric names).
SHORT = {
    "Instruction Adherence": "IA",
    "Fluency": "Flu",
    "Coherency": "Coh",
    "Image-Text Relevance": "ITR",
    "Response Accuracy": "RA",
    "Personality Consistency": "PC",
    "Knowledge Consistency": "KC",
    "Tone Consistency": "TC",
}


@dataclass
class FileResult:
    """The per-file means, as in the published ``<set>_results/<model>/<type>_test.csv``."""

    model: str
    set_name: str
    dialogue_type: str
    count: int
    stat: GroupStat
    source: str = ""

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "set": self.set_name,
            "dialogue_type": self.dialogue_type,
            "count": self.count,
            "source": self.source,
            **{k: v for k, v in self.stat.to_dict().items() if k not in ("model", "set", "dialogue_type", "role")},
        }


@dataclass
class EvalReport:
    models: list[str]
    files: list[FileResult]
    overall: list[GroupStat]  # per model, all sets
    by_set: list[GroupStat]  # per model x set
    by_type: list[GroupStat]  # per model x dialogue type (all sets)
    by_character: list[GroupStat]  # per model x role
    load_stats: list[LoadStats] = field(default_factory=list)
    bootstrap: int = 0
    seed: int = 0
    source: str = ""
    length_bias: list = field(default_factory=list)  # stats.LengthBias per model
    position: dict = field(default_factory=dict)  # model -> {metric: BiasStat}, when a swapped run exists
    judges: dict = field(default_factory=dict)  # model -> judge settings record (judge_results/<model>.judge.json)

    def table(self, set_name: str = ALL) -> list[GroupStat]:
        return self.overall if set_name == ALL else [g for g in self.by_set if g.set_name == set_name]

    def sets(self) -> list[str]:
        return sorted({g.set_name for g in self.by_set}, key=lambda s: known_first(s, SETS))

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "models": self.models,
            "metrics": list(METRICS),
            "dimensions": {d: list(ms) for d, ms in DIMENSIONS.items()},
            "bootstrap": self.bootstrap,
            "seed": self.seed,
            "overall": [g.to_dict() for g in self.overall],
            "by_set": [g.to_dict() for g in self.by_set],
            "by_dialogue_type": [g.to_dict() for g in self.by_type],
            "by_character": [g.to_dict() for g in self.by_character],
            "files": [f.to_dict() for f in self.files],
            "loading": [s.to_dict() for s in self.load_stats],
            "bias": {
                "length": [b.to_dict() for b in self.length_bias],
                "position": {m: {k: v.to_dict() for k, v in d.items()} for m, d in self.position.items()},
            },
            "judges": self.judges,
        }


def report_from_rows(
    rows: Sequence[ScoreRow],
    file_counts: Optional[dict] = None,
    bootstrap: int = 1000,
    seed: int = 0,
    load_stats: Optional[list[LoadStats]] = None,
    source: str = "",
) -> EvalReport:
    """Build a report from score rows (from reviews files or from a scoring run's results)."""
    files = []
    for g in summarize(rows, by=("model", "set_name", "dialogue_type")):
        count = (file_counts or {}).get((g.model, g.set_name, g.dialogue_type), g.n_samples)
        files.append(FileResult(g.model, g.set_name, g.dialogue_type, count, g))
    models = list(dict.fromkeys(r.model for r in rows))
    return EvalReport(
        models=models,
        files=files,
        overall=summarize(rows, by=("model",), bootstrap=bootstrap, seed=seed),
        by_set=summarize(rows, by=("model", "set_name"), bootstrap=bootstrap, seed=seed),
        by_type=summarize(rows, by=("model", "dialogue_type"), bootstrap=bootstrap, seed=seed),
        by_character=summarize(rows, by=("model", "role")),  # too few samples per role for useful CIs
        load_stats=list(load_stats or []),
        bootstrap=bootstrap,
        seed=seed,
        source=source,
        length_bias=length_bias(per_sample_length_ratio(rows)),
    )


def position_runs(eval_dir: Union[str, Path], models: Sequence[str]) -> dict:
    """Position consistency of every model with both a normal and a swapped-order results store under
    ``<eval_dir>/judge_results/``."""
    from .store import ResultsStore

    out = {}
    root = Path(eval_dir) / "judge_results"
    for m in models:
        normal, swapped = root / f"{m}.jsonl", root / f"{m}.swapped.jsonl"
        if normal.is_file() and swapped.is_file():
            out[m] = position_bias(ResultsStore(normal).load(), ResultsStore(swapped).load())
    return out


def build_report(
    eval_dir: Union[str, Path],
    bootstrap: int = 1000,
    seed: int = 0,
    strict: bool = False,
    models: Optional[Sequence[str]] = None,
) -> EvalReport:
    """Read every ``<set>_reviews/<model>/<type>_test.json`` under ``eval_dir`` and aggregate."""
    found = discover(eval_dir, "reviews", "json")
    if models:
        unknown = set(models) - {f.model for f in found}
        if unknown:
            raise EvalDataError(f"{eval_dir}: no reviews for model(s) {sorted(unknown)}")
        found = [f for f in found if f.model in models]
    if not found:
        raise EvalDataError(f"{eval_dir}: no <set>_reviews/<model>/<type>_test.json files found")
    rows: list[ScoreRow] = []
    stats: list[LoadStats] = []
    counts = {}
    for f in found:
        recs, st = load_reviews_file(f.path, set_name=f.set_name, dialogue_type=f.dialogue_type, strict=strict)
        stats.append(st)
        counts[(f.model, f.set_name, f.dialogue_type)] = len(recs)
        rows.extend(rows_from_reviews(recs, f.model))
    rep = report_from_rows(rows, counts, bootstrap, seed, stats, str(eval_dir))
    rep.position = position_runs(eval_dir, rep.models)
    rep.judges = read_judge_settings(eval_dir, rep.models)
    for fr in rep.files:
        fr.source = str(
            next(
                f.path
                for f in found
                if (f.model, f.set_name, f.dialogue_type) == (fr.model, fr.set_name, fr.dialogue_type)
            )
        )
    return rep


# ---------------------------------------------------------------------------------------------- output


def _f(v: Optional[float], nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def _ci_s(ci) -> str:
    return "" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def render_markdown(report: EvalReport) -> str:
    """Per-model tables (8 metrics + Overall) for all sets and per set, then dimensions and failures."""
    lines = []
    head = ["Model", "N"] + [SHORT[m] for m in METRICS] + ["Overall", "95% CI", "Failed"]
    for set_name in [ALL] + report.sets():
        lines += [
            f"### {'All test sets' if set_name == ALL else set_name}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for g in report.table(set_name):
            cells = (
                [g.model, str(g.n_samples)]
                + [_f(g.metrics[m].mean) for m in METRICS]
                + [_f(g.overall), _ci_s(g.overall_ci), str(g.n_failed)]
            )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "### Dimensions (all test sets)",
        "",
        "| Model | " + " | ".join(DIMENSIONS) + " |",
        "|---|" + "---|" * len(DIMENSIONS),
    ]
    for g in report.overall:
        lines.append("| " + " | ".join([g.model] + [_f(g.dimensions.get(d)) for d in DIMENSIONS]) + " |")
    lines += ["", "### By dialogue type (all test sets)", "", "| Model | Type | N | Overall |", "|---|---|---|---|"]
    for g in report.by_type:
        lines.append(f"| {g.model} | {g.dialogue_type} | {g.n_samples} | {_f(g.overall)} |")
    lines.append("")
    legend = ", ".join(f"{v} = {k}" for k, v in SHORT.items())
    lines += [f"Columns: {legend}. Scores are A/B (model / ground truth); Overall = mean of the 8 metric means."]
    failed = [g for g in report.overall if g.n_failed]
    if failed:
        lines += ["", "Failures (excluded from the means):"]
        for g in failed:
            lines.append(f"- {g.model}: {g.n_failed} — " + "; ".join(f"{r}: {c}" for r, c in g.failures.items()))
    rejected = [s for s in report.load_stats if s.rejected]
    if rejected:
        lines += ["", "Rejected records:"] + [f"- {s.summary()}" for s in rejected]
    lines += render_bias(report) + render_judges(report.judges, SHORT)
    return "\n".join(lines) + "\n"


def render_bias(report: EvalReport) -> list[str]:
    """The bias section: score vs answer length, and position consistency where a swapped run exists."""
    if not report.length_bias and not report.position:
        return []
    lines = [
        "",
        "### Bias: score vs answer length",
        "",
        "Per-sample mean A/B against the length (characters) of the answer under test; quartiles by length.",
        "",
        "| Model | N | Pearson | Spearman | Q1 | Q2 | Q3 | Q4 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in report.length_bias:
        qs = [f"{r:.3f} (<= {int(mx)} ch)" for mx, r, _ in b.quartile_means] + [""] * (4 - len(b.quartile_means))
        lines.append(f"| {b.model} | {b.n} | {_f(b.pearson)} | {_f(b.spearman)} | " + " | ".join(qs) + " |")
    if report.position:
        lines += [
            "",
            "### Bias: position consistency (normal vs swapped order)",
            "",
            "| Model | Pairs | Mean A/B normal | Mean A/B swapped | Difference | Preference flips |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for m, d in report.position.items():
            b = d[ALL]
            lines.append(
                f"| {m} | {b.n_pairs} | {_f(b.mean_original)} | {_f(b.mean_swapped)} | {_f(b.diff)} | "
                f"{_f(b.preference_flip_rate)} |"
            )
    return lines


def _stat_row(g: GroupStat) -> dict:
    row = {
        "model": g.model,
        "set": g.set_name,
        "dialogue_type": g.dialogue_type,
        "role": g.role,
        "n_samples": g.n_samples,
    }
    row.update({m: g.metrics[m].mean for m in METRICS})
    row.update({d: g.dimensions.get(d) for d in DIMENSIONS})
    lo, hi = g.overall_ci or (None, None)
    row.update({"Overall": g.overall, "Overall_ci_low": lo, "Overall_ci_high": hi, "n_failed": g.n_failed})
    return row


def _write_csv(path: Path, stats: Sequence[GroupStat], drop: Sequence[str] = ()) -> None:
    rows = [{k: v for k, v in _stat_row(g).items() if k not in drop} for g in stats]
    if not rows:
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in r.items()})


def write_report(
    report: EvalReport, out_dir: Union[str, Path], plots: bool = True, radar_models: Optional[Sequence[str]] = None
) -> list[Path]:
    """Write summary/by-type/by-character CSVs, per-file results CSVs (published layout), JSON, Markdown and
    plots; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / "summary.csv"
    _write_csv(p, report.overall + report.by_set, drop=("dialogue_type", "role"))
    written.append(p)
    p = out / "by_dialogue_type.csv"
    _write_csv(p, report.by_type, drop=("set", "role"))
    written.append(p)
    p = out / "by_character.csv"
    _write_csv(p, report.by_character, drop=("set", "dialogue_type", "Overall_ci_low", "Overall_ci_high"))
    written.append(p)
    for fr in report.files:
        p = out / f"{fr.set_name}_results" / fr.model / f"{fr.dialogue_type}_test.csv"
        write_results_csv(p, fr.count, fr.stat.means())
        written.append(p)
    p = out / "report.json"
    p.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    written.append(p)
    p = out / "report.md"
    p.write_text(render_markdown(report), encoding="utf-8")
    written.append(p)
    if plots:
        written += plot_report(report, out, radar_models)
    return written


_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


def model_styles(n: int) -> list[dict]:
    """Distinct line styles for ``n`` models: 20 colours (tab20), then a new line style per round of colours,
    and a marker each; no two models share colour and line style (for up to 80 models)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))  # the 10 strong colours first, then their light pairs
    return [
        {
            "color": cmap(order[i % 20]),
            "linestyle": _LINESTYLES[(i // 20) % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)],
        }
        for i in range(n)
    ]


def radial_range(values: Sequence[float], pad: float = 0.15) -> tuple[float, float]:
    """A radial axis range fitted to the data (with a margin), instead of starting at 0."""
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    span = max(hi - lo, 0.05)
    return max(0.0, lo - pad * span), hi + pad * span


def plot_report(
    report: EvalReport, out_dir: Union[str, Path], radar_models: Optional[Sequence[str]] = None
) -> list[Path]:
    """``radar.png`` (8 metric means per model, radial range fitted; ``radar_models`` = a subset),
    ``dimensions.png`` (bars per dimension and model), ``leaderboard.png`` (Overall with its 95% interval,
    ranked) and ``heatmap.png`` (model x metric). Every model keeps one style across plots."""
    import math

    # Figure + Agg canvas, not pyplot: no global backend switch, safe in headless workers and threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    stats = report.overall
    styles = dict(zip([g.model for g in stats], model_styles(len(stats))))
    paths = []

    radar = [g for g in stats if not radar_models or g.model in radar_models]
    fig = Figure(figsize=(7, 7))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="polar")
    angles = [2 * math.pi * i / len(METRICS) for i in range(len(METRICS))]
    all_vals = []
    for g in radar:
        vals = [g.metrics[m].mean if g.metrics[m].mean is not None else float("nan") for m in METRICS]
        all_vals += vals
        st = styles[g.model]
        ax.plot(angles + angles[:1], vals + vals[:1], label=g.model, markersize=4, linewidth=1.3, **st)
        if len(radar) <= 4:  # fills only help with few models
            ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.08, color=st["color"])
    lo, hi = radial_range(all_vals)
    ax.set_ylim(lo, hi)
    ax.set_xticks(angles)
    ax.set_xticklabels([m.replace(" ", "\n") for m in METRICS], fontsize=8)
    ax.set_title(f"Metric means (A/B, all test sets; radius {lo:.2f} to {hi:.2f})")
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=7)
    p = out / "radar.png"
    fig.savefig(p, dpi=100, bbox_inches="tight")
    paths.append(p)

    fig = Figure(figsize=(max(8, 0.5 * len(stats) * len(DIMENSIONS)), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    n = max(1, len(stats))
    width = 0.8 / n
    for i, g in enumerate(stats):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(DIMENSIONS))]
        vals = [g.dimensions.get(d) if g.dimensions.get(d) is not None else float("nan") for d in DIMENSIONS]
        ax.bar(xs, vals, width=width, label=g.model, color=styles[g.model]["color"])
    ax.set_xticks(range(len(DIMENSIONS)))
    ax.set_xticklabels(list(DIMENSIONS), fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylabel("mean A/B")
    ax.set_title("Dimension means (all test sets)")
    ax.legend(fontsize=7, ncol=2)
    p = out / "dimensions.png"
    fig.savefig(p, dpi=100, bbox_inches="tight")
    paths.append(p)

    ranked = sorted((g for g in stats if g.overall is not None), key=lambda g: g.overall)
    fig = Figure(figsize=(7, 1.2 + 0.35 * max(1, len(ranked))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for y, g in enumerate(ranked):
        lo_hi = g.overall_ci
        # clamped: when every score is the same, the bootstrap bounds can differ from the mean in the last bit
        err = [[max(0.0, g.overall - lo_hi[0])], [max(0.0, lo_hi[1] - g.overall)]] if lo_hi else None
        st = styles[g.model]
        ax.errorbar([g.overall], [y], xerr=err, fmt=st["marker"], color=st["color"], capsize=3)
    ax.set_yticks(range(len(ranked)))
    ax.set_yticklabels([g.model for g in ranked], fontsize=8)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("Overall (mean A/B of the 8 metrics) with 95% bootstrap interval")
    ax.set_title("Leaderboard (all test sets)")
    p = out / "leaderboard.png"
    fig.savefig(p, dpi=100, bbox_inches="tight")
    paths.append(p)

    fig = Figure(figsize=(1.2 + 0.9 * len(METRICS), 1.2 + 0.45 * max(1, len(stats))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    grid = [[g.metrics[m].mean if g.metrics[m].mean is not None else float("nan") for m in METRICS] for g in stats]
    im = ax.imshow(grid, cmap="RdYlGn", aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "n/a" if v != v else f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(METRICS)))
    ax.set_xticklabels([SHORT[m] for m in METRICS], fontsize=8)
    ax.set_yticks(range(len(stats)))
    ax.set_yticklabels([g.model for g in stats], fontsize=8)
    fig.colorbar(im, ax=ax, label="mean A/B")
    ax.set_title("Model x metric (all test sets)")
    p = out / "heatmap.png"
    fig.savefig(p, dpi=100, bbox_inches="tight")
    paths.append(p)
    return paths
