"""Aggregation: per (sample, metric) score = A / B; means per file, set, dialogue type, dimension, character;
overall = mean of the metric means; seeded bootstrap 95% CIs; optional position-bias comparison.

Means are plain ``sum(ratios) / n`` in file order, which reproduces the published per-file CSVs bit for bit.
Grouping several files pools their samples, i.e. the sample-weighted mean of the file means. Failures (no
score) are excluded from every mean and counted per metric and per reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from .contract import JudgeResult, Key
from .formats import AnswerRecord, ReviewRecord
from .metrics import DIMENSIONS, METRICS

ALL = "all"
GROUP_FIELDS = ("model", "set_name", "dialogue_type", "role")


@dataclass(frozen=True)
class ScoreRow:
    """One (sample, metric) score of one model; ``ratio`` is None for a failure (``error`` says why)."""

    model: str
    set_name: str
    dialogue_type: str
    sample_id: str
    role: str
    metric: str
    ratio: Optional[float]
    error: Optional[str] = None
    answer_chars: Optional[int] = None  # length of the answer under test (length-bias statistics)


@dataclass
class MetricStat:
    mean: Optional[float]
    n: int  # valid scores
    n_failed: int
    ci: Optional[tuple[float, float]] = None

    def to_dict(self) -> dict:
        return {"mean": self.mean, "n": self.n, "n_failed": self.n_failed, "ci": list(self.ci) if self.ci else None}


@dataclass
class GroupStat:
    """Means of one group (e.g. model x set). Fields absent from the grouping read ``all``."""

    model: str = ALL
    set_name: str = ALL
    dialogue_type: str = ALL
    role: str = ALL
    n_samples: int = 0
    metrics: dict[str, MetricStat] = field(default_factory=dict)
    dimensions: dict[str, Optional[float]] = field(default_factory=dict)
    dimension_ci: dict[str, Optional[tuple[float, float]]] = field(default_factory=dict)
    overall: Optional[float] = None
    overall_ci: Optional[tuple[float, float]] = None
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def n_failed(self) -> int:
        return sum(s.n_failed for s in self.metrics.values())

    def means(self) -> dict[str, Optional[float]]:
        return {m: s.mean for m, s in self.metrics.items()}

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "set": self.set_name,
            "dialogue_type": self.dialogue_type,
            "role": self.role,
            "n_samples": self.n_samples,
            "metrics": {m: s.to_dict() for m, s in self.metrics.items()},
            "dimensions": self.dimensions,
            "dimension_ci": {d: (list(c) if c else None) for d, c in self.dimension_ci.items()},
            "overall": self.overall,
            "overall_ci": list(self.overall_ci) if self.overall_ci else None,
            "n_failed": self.n_failed,
            "failures": dict(self.failures),
        }


# ------------------------------------------------------------------------------------------------- rows


def rows_from_reviews(records: Iterable[ReviewRecord], model: str, metrics: Sequence[str] = METRICS) -> list[ScoreRow]:
    """Score rows of a reviews file (published or ours), in file order."""
    out = []
    for rec in records:
        a = rec.answer
        for m in metrics:
            e = rec.reviews[m]
            out.append(ScoreRow(model, a.set_name, a.dialogue_type, a.id, a.role, m, e.ratio, e.error, len(a.answer)))
    return out


def rows_from_results(
    answers: Iterable[AnswerRecord], results: Mapping[Key, JudgeResult], model: str, metrics: Sequence[str] = METRICS
) -> list[ScoreRow]:
    """Score rows of a scoring run; a (sample, metric) without a result is a failure 'no result'."""
    out = []
    for a in answers:
        for m in metrics:
            r = results.get((a.id, m))
            if r is None:
                out.append(
                    ScoreRow(model, a.set_name, a.dialogue_type, a.id, a.role, m, None, "no result", len(a.answer))
                )
            else:
                out.append(
                    ScoreRow(
                        model,
                        a.set_name,
                        a.dialogue_type,
                        a.id,
                        a.role,
                        m,
                        r.ratio,
                        None if r.ok else (r.error or "failed"),
                        len(a.answer),
                    )
                )
    return out


# --------------------------------------------------------------------------------------------- summaries


def _mean(xs: Sequence[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None  # plain left-to-right sum: what the published CSVs used


def _mean_of(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = list(values)
    return None if not vals or any(v is None for v in vals) else sum(vals) / len(vals)


def _bootstrap(strata: list, n_metrics: int, n_boot: int, seed: int):
    """Per-metric means of ``n_boot`` resamples (B x M), resampling samples within each stratum (file) so the
    sample weighting of the files is kept; NaN marks failures, excluded like in the point estimate."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sums = np.zeros((n_boot, n_metrics))
    cnts = np.zeros((n_boot, n_metrics))
    for x in strata:
        n = x.shape[0]
        idx = rng.integers(0, n, size=(n_boot, n))
        v = x[idx]  # B x n x M
        ok = ~np.isnan(v)
        sums += np.where(ok, v, 0.0).sum(axis=1)
        cnts += ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / cnts


def _ci(values, confidence: float) -> Optional[tuple[float, float]]:
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


def summarize(
    rows: Sequence[ScoreRow],
    by: Sequence[str] = ("model",),
    metrics: Sequence[str] = METRICS,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[GroupStat]:
    """Group rows by ``by`` (fields of :class:`ScoreRow`: model, set_name, dialogue_type, role) and compute
    metric, dimension and overall means; ``bootstrap`` > 0 adds percentile CIs (seeded, per group)."""
    bad = [b for b in by if b not in GROUP_FIELDS]
    if bad:
        raise ValueError(f"cannot group by {bad}; choose from {GROUP_FIELDS}")
    groups: dict[tuple, list[ScoreRow]] = {}
    for r in rows:
        groups.setdefault(tuple(getattr(r, b) for b in by), []).append(r)
    out = []
    for gi, (gkey, grows) in enumerate(groups.items()):
        stat = GroupStat(**dict(zip(by, gkey)))
        per_metric: dict[str, list[float]] = {m: [] for m in metrics}
        failed: Counter = Counter()
        failures: Counter = Counter()
        samples: dict[tuple, dict[str, Optional[float]]] = {}  # (model, set, type, id) -> metric -> ratio
        for r in grows:
            if r.metric not in per_metric:
                continue
            samples.setdefault((r.model, r.set_name, r.dialogue_type, r.sample_id), {})[r.metric] = r.ratio
            if r.ratio is None:
                failed[r.metric] += 1
                failures[r.error or "failed"] += 1
            else:
                per_metric[r.metric].append(r.ratio)
        stat.n_samples = len(samples)
        stat.failures = dict(failures)
        stat.metrics = {m: MetricStat(_mean(per_metric[m]), len(per_metric[m]), failed[m]) for m in metrics}
        dims = {d: [m for m in ms if m in metrics] for d, ms in DIMENSIONS.items()}
        dims = {d: ms for d, ms in dims.items() if ms}
        stat.dimensions = {d: _mean_of(stat.metrics[m].mean for m in ms) for d, ms in dims.items()}
        stat.overall = _mean_of(stat.metrics[m].mean for m in metrics)
        if bootstrap > 0:
            import numpy as np

            strata: dict[tuple, list] = {}
            for skey, vals in samples.items():
                strata.setdefault(skey[:3], []).append([np.nan if vals.get(m) is None else vals[m] for m in metrics])
            boots = _bootstrap(
                [np.asarray(v, dtype=float) for v in strata.values()], len(metrics), bootstrap, seed + gi
            )
            for j, m in enumerate(metrics):
                stat.metrics[m].ci = _ci(boots[:, j], confidence)
            for d, ms in dims.items():
                cols = [metrics.index(m) for m in ms]
                stat.dimension_ci[d] = _ci(boots[:, cols].mean(axis=1), confidence)
            stat.overall_ci = _ci(boots.mean(axis=1), confidence)
        out.append(stat)
    return out


# ----------------------------------------------------------------------------------------- position bias


@dataclass
class BiasStat:
    n_pairs: int
    mean_original: Optional[float]
    mean_swapped: Optional[float]
    diff: Optional[float]  # original - swapped: > 0 means the model scores higher when shown first
    mean_abs_diff: Optional[float]
    preference_flip_rate: Optional[float]  # share of pairs where the preferred answer changes with the order

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def position_bias(
    original: Mapping[Key, JudgeResult], swapped: Mapping[Key, JudgeResult], metrics: Sequence[str] = METRICS
) -> dict[str, BiasStat]:
    """Compare the A/B scores of the normal run with the run where the answers were shown swapped (both stored
    un-swapped). Only keys scored in both runs count. Returns one entry per metric plus ``all``."""

    def stat(keys: list[Key]) -> BiasStat:
        if not keys:
            return BiasStat(0, None, None, None, None, None)
        o = [original[k].ratio for k in keys]
        s = [swapped[k].ratio for k in keys]

        def sign(r):
            return (r.score_a > r.score_b) - (r.score_a < r.score_b)

        flips = sum(sign(original[k]) != sign(swapped[k]) for k in keys)
        mo, ms = sum(o) / len(o), sum(s) / len(s)
        return BiasStat(
            len(keys), mo, ms, mo - ms, sum(abs(a - b) for a, b in zip(o, s)) / len(keys), flips / len(keys)
        )

    both = [k for k, r in original.items() if r.ok and k in swapped and swapped[k].ok and k[1] in metrics]
    out = {m: stat([k for k in both if k[1] == m]) for m in metrics}
    out[ALL] = stat(both)
    return out


def per_sample_length_ratio(rows: Iterable[ScoreRow]) -> dict[str, list[tuple[int, float]]]:
    """``{model: [(answer length, mean A/B over the sample's scored metrics)]}`` for the length-bias section."""
    acc: dict[tuple[str, str, str], list] = {}
    for r in rows:
        if r.ratio is None or r.answer_chars is None:
            continue
        acc.setdefault((r.model, r.set_name, r.sample_id), [r.answer_chars, []])[1].append(r.ratio)
    out: dict[str, list[tuple[int, float]]] = {}
    for (model, _, _), (n, ratios) in acc.items():
        out.setdefault(model, []).append((n, sum(ratios) / len(ratios)))
    return out
