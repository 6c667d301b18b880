"""Single-process building blocks of a scoring run; the Ray jobs are thin wrappers around them.

answers, stats = load_answers_dir(eval_dir, model)          # <set>_answers/<model>/<type>_test.json
requests = expand_requests(answers)                          # one per (sample, metric)
summary = score_requests(requests, judge, store)             # resumable: skips what the store has
write_model_outputs(eval_dir, model, answers, store.load())  # <set>_reviews/..., <set>_results/...
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .aggregate import rows_from_results, summarize
from .contract import Judge, JudgeRequest, JudgeResult, Key
from .formats import AnswerRecord, EvalDataError, LoadStats, load_answers_file, write_results_csv, write_reviews_file
from .layout import discover
from .metrics import METRICS, eval_file
from .store import ResultsStore


def load_answers_dir(
    eval_dir: Union[str, Path], model: str, strict: bool = False
) -> tuple[list[AnswerRecord], list[LoadStats]]:
    """All ``<set>_answers/<model>/<type>_test.json`` of one model, in set/type/file order."""
    files = [f for f in discover(eval_dir, "answers", "json") if f.model == model]
    if not files:
        raise EvalDataError(f"{eval_dir}: no <set>_answers/{model}/<type>_test.json files found")
    answers: list[AnswerRecord] = []
    stats = []
    for f in files:
        recs, st = load_answers_file(f.path, set_name=f.set_name, dialogue_type=f.dialogue_type, strict=strict)
        answers.extend(recs)
        stats.append(st)
    return answers, stats


@dataclass
class ScoringSummary:
    n_requests: int = 0
    n_already_done: int = 0  # found in the store (resume)
    n_scored: int = 0
    n_ok: int = 0
    n_failed: int = 0
    n_batches: int = 0
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.n_scored / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**self.__dict__, "requests_per_s": self.requests_per_s}


def score_requests(
    requests: Sequence[JudgeRequest],
    judge: Judge,
    store: ResultsStore,
    batch_size: int = 32,
    retry_failed: bool = False,
    progress: Optional[Callable[[ScoringSummary], None]] = None,
) -> ScoringSummary:
    """Score what the store does not have yet, batch by batch, appending each batch's results before the next
    (a crash loses at most one batch). Checks that the judge answered every request of a batch exactly once."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    t0 = time.perf_counter()
    todo = store.pending(requests, retry_failed=retry_failed)
    summary = ScoringSummary(n_requests=len(requests), n_already_done=len(requests) - len(todo))
    reasons: Counter = Counter()
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        results = judge.score_batch(batch)
        if [r.key for r in results] != [q.key for q in batch]:
            raise RuntimeError(
                f"judge {getattr(judge, 'name', judge)!r} returned results that do not match the "
                f"batch's (sample_id, metric) keys one to one"
            )
        store.append(results)
        summary.n_batches += 1
        summary.n_scored += len(results)
        for r in results:
            if r.ok:
                summary.n_ok += 1
            else:
                summary.n_failed += 1
                reasons[(r.error or "failed").split(":")[0]] += 1
        summary.failures = dict(reasons)
        summary.seconds = time.perf_counter() - t0
        if progress:
            progress(summary)
    summary.seconds = time.perf_counter() - t0
    return summary


def write_model_outputs(
    out_dir: Union[str, Path],
    model: str,
    answers: Sequence[AnswerRecord],
    results: Mapping[Key, JudgeResult],
    metrics: Sequence[str] = METRICS,
) -> list[Path]:
    """Write ``<set>_reviews/<model>/<type>_test.json`` and ``<set>_results/<model>/<type>_test.csv`` for every
    (set, type) of ``answers`` (published formats). Raises if any (id, metric) lacks a result."""
    groups: dict[tuple[str, str], list[AnswerRecord]] = {}
    for a in answers:
        if not a.set_name or not a.dialogue_type:
            raise EvalDataError(f"{a.source}: record {a.id}: set_name/dialogue_type unknown; cannot place output")
        groups.setdefault((a.set_name, a.dialogue_type), []).append(a)
    written = []
    for (set_name, dtype), recs in groups.items():
        p = eval_file(out_dir, set_name, "reviews", model, dtype)
        write_reviews_file(p, recs, results, metrics)
        written.append(p)
        (stat,) = summarize(rows_from_results(recs, results, model, metrics), by=("model",), metrics=metrics)
        p = eval_file(out_dir, set_name, "results", model, dtype, "csv")
        write_results_csv(p, len(recs), stat.means(), metrics)
        written.append(p)
    return written
