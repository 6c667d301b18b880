"""Read and write the published eval artefacts: answers JSON, reviews JSON and per-file results CSV.

Layout (any number of models)::

    <set>_answers/<model>/<type>_test.json   records with conversations[1].answer (the model's answer)
    <set>_reviews/<model>/<type>_test.json   the same records plus rm_review[metric] = {review, score: [A, B]}
    <set>_results/<model>/<type>_test.csv    count + the 8 metric means (CRLF, as published)

Loaders raise :class:`EvalDataError` (naming the file) for unreadable files and, with ``strict=True``, for bad
records (naming the file and record id); otherwise bad records are rejected with a reason in :class:`LoadStats`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .metrics import METRICS
from .parse import ScoreParseError, check_pair

PathLike = Union[str, Path]
RESULTS_CSV_NEWLINE = "\r\n"  # the published CSVs were written with CRLF line ends


class EvalDataError(ValueError):
    """Unusable eval input: unreadable/malformed file, or (strict mode) a bad record."""


@dataclass
class LoadStats:
    """What a loader did: records read, kept and rejected (with id and reason)."""

    path: str
    n_in: int = 0
    n_out: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (record id, reason)
    warnings: list[str] = field(default_factory=list)

    def reject(self, rid: str, reason: str, strict: bool) -> None:
        if strict:
            raise EvalDataError(f"{self.path}: record {rid}: {reason}")
        self.rejected.append((rid, reason))

    def summary(self) -> str:
        s = f"{self.path}: {self.n_in} in, {self.n_out} out, {len(self.rejected)} rejected"
        if self.rejected:
            s += (
                " ("
                + "; ".join(f"{i}: {r}" for i, r in self.rejected[:5])
                + (" ..." if len(self.rejected) > 5 else "")
                + ")"
            )
        return s

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "rejected": [{"id": i, "reason": r} for i, r in self.rejected],
            "warnings": list(self.warnings),
        }


@dataclass
class AnswerRecord:
    """One test sample with the evaluated model's answer (``answer``) and the ground truth (``reference``)."""

    id: str
    question: str  # conversations[0].value: the whole rendered question
    reference: str  # conversations[1].value: the ground-truth answer (Model B)
    answer: str  # conversations[1].answer: the answer under test (Model A)
    image: str  # relative to the images root
    role: str
    other_role: str = ""
    script: str = ""
    system: str = ""
    set_name: str = ""  # in-test / out-test
    dialogue_type: str = ""  # comment / human-role / inter-role
    source: str = ""  # file it came from
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the record as read, for writing back


@dataclass
class ReviewEntry:
    """One metric of one sample in a reviews file. ``score`` is None for a recorded failure."""

    review: str
    score: Optional[tuple[float, float]]
    error: Optional[str] = None

    @property
    def ratio(self) -> Optional[float]:
        return None if self.score is None else self.score[0] / self.score[1]


@dataclass
class ReviewRecord:
    answer: AnswerRecord
    reviews: dict[str, ReviewEntry]  # metric -> entry (all 8 present; absent ones are failures)

    @property
    def id(self) -> str:
        return self.answer.id


def read_json_list(path: PathLike) -> list:
    """A JSON file holding a list; errors name the file."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise EvalDataError(f"{p}: cannot read ({e})") from e
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{p}: malformed JSON ({e})") from e
    if not isinstance(data, list):
        raise EvalDataError(f"{p}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _str_field(rec: dict, name: str, required: bool = True) -> str:
    v = rec.get(name)
    if v is None:
        if required:
            raise KeyError(f"missing field {name!r}")
        return ""
    if not isinstance(v, str):
        raise KeyError(f"field {name!r} is {type(v).__name__}, expected a string")
    return v


def parse_answer_record(
    rec: Any, *, set_name: str = "", dialogue_type: str = "", source: str = "", require_answer: bool = True
) -> AnswerRecord:
    """One published answers/reviews record -> :class:`AnswerRecord`; raises KeyError with the reason."""
    if not isinstance(rec, dict):
        raise KeyError(f"record is {type(rec).__name__}, expected an object")
    rid = _str_field(rec, "id")
    if not rid:
        raise KeyError("empty id")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) for c in conv[:2]):
        raise KeyError("'conversations' must hold the question and the answer turn")
    question, turn = conv[0].get("value"), conv[1]
    if not isinstance(question, str) or not question.strip():
        raise KeyError("conversations[0].value (the question) is missing or empty")
    reference = turn.get("value")
    if not isinstance(reference, str):
        raise KeyError("conversations[1].value (the ground truth) is missing")
    answer = turn.get("answer")
    if answer is None and require_answer:
        raise KeyError("conversations[1].answer (the model's answer) is missing")
    if answer is not None and not isinstance(answer, str):
        raise KeyError(f"conversations[1].answer is {type(answer).__name__}, expected a string")
    return AnswerRecord(
        id=rid,
        question=question,
        reference=reference,
        answer=answer or "",
        image=_str_field(rec, "image"),
        role=_str_field(rec, "role"),
        other_role=_str_field(rec, "other_role", False),
        script=_str_field(rec, "script", False),
        system=_str_field(rec, "system", False),
        set_name=set_name,
        dialogue_type=dialogue_type,
        source=source,
        raw=rec,
    )


def _rid(rec: Any, index: int) -> str:
    rid = rec.get("id") if isinstance(rec, dict) else None
    return rid if isinstance(rid, str) and rid else f"#{index}"


def load_answers_file(
    path: PathLike, *, set_name: str = "", dialogue_type: str = "", strict: bool = False
) -> tuple[list[AnswerRecord], LoadStats]:
    """Read a published-format answers file (``conversations[1].answer`` = the answer under test)."""
    path = Path(path)
    stats = LoadStats(str(path))
    data = read_json_list(path)
    out: list[AnswerRecord] = []
    seen: set[str] = set()
    for i, rec in enumerate(data):
        stats.n_in += 1
        rid = _rid(rec, i)
        try:
            a = parse_answer_record(rec, set_name=set_name, dialogue_type=dialogue_type, source=str(path))
        except KeyError as e:
            stats.reject(rid, e.args[0], strict)
            continue
        if a.id in seen:
            stats.reject(rid, "duplicate id", strict)
            continue
        seen.add(a.id)
        out.append(a)
    stats.n_out = len(out)
    return out, stats


def parse_review_entry(v: Any) -> ReviewEntry:
    """``{review, score: [A, B]}`` -> entry; anything unusable becomes a failure entry with the reason."""
    if not isinstance(v, dict):
        return ReviewEntry(review="", score=None, error=f"review entry is {type(v).__name__}, expected an object")
    review = v.get("review")
    review = review if isinstance(review, str) else ""
    if v.get("score") is None:
        return ReviewEntry(review=review, score=None, error=str(v.get("error") or "no score (recorded failure)"))
    try:
        return ReviewEntry(review=review, score=check_pair(v["score"]), error=None)
    except ScoreParseError as e:
        return ReviewEntry(review=review, score=None, error=e.reason)


def load_reviews_file(
    path: PathLike,
    *,
    set_name: str = "",
    dialogue_type: str = "",
    strict: bool = False,
    metrics: Sequence[str] = METRICS,
) -> tuple[list[ReviewRecord], LoadStats]:
    """Read a published-format reviews file. A metric that is absent or has an unusable score is kept as a
    failure entry (excluded from means, counted); a record without ``rm_review`` is rejected."""
    path = Path(path)
    stats = LoadStats(str(path))
    data = read_json_list(path)
    out: list[ReviewRecord] = []
    seen: set[str] = set()
    for i, rec in enumerate(data):
        stats.n_in += 1
        rid = _rid(rec, i)
        try:
            # Reviews of ground-truth-only runs may lack 'answer'; the score is what matters here.
            a = parse_answer_record(
                rec, set_name=set_name, dialogue_type=dialogue_type, source=str(path), require_answer=False
            )
        except KeyError as e:
            stats.reject(rid, e.args[0], strict)
            continue
        rm = rec.get("rm_review")
        if not isinstance(rm, dict):
            stats.reject(rid, "missing or malformed 'rm_review'", strict)
            continue
        if a.id in seen:
            stats.reject(rid, "duplicate id", strict)
            continue
        seen.add(a.id)
        reviews = {}
        for m in metrics:
            if m in rm:
                reviews[m] = parse_review_entry(rm[m])
            else:
                reviews[m] = ReviewEntry(review="", score=None, error=f"metric {m!r} absent from rm_review")
        extra = sorted(set(rm) - set(METRICS))
        if extra:
            stats.warnings.append(f"record {a.id}: unknown rm_review keys {extra} ignored")
        out.append(ReviewRecord(answer=a, reviews=reviews))
    stats.n_out = len(out)
    return out, stats


# ----------------------------------------------------------------------------------------------- writing


def _dump_json(path: PathLike, data) -> None:
    """Write like the published files (indent 4, UTF-8 kept), atomically so a crash leaves no half file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=4)
    os.replace(tmp, p)


def answer_record_dict(sample, answer: str) -> dict:
    """A published-format answers record from a :class:`mmrole.data.records.Sample` and the model's answer."""
    from mmrole.data.records import published_test_record

    return published_test_record(sample, answer)


def write_answers_file(path: PathLike, records: Iterable[dict]) -> int:
    """Write answers records (see :func:`answer_record_dict`); returns the count."""
    records = list(records)
    _dump_json(path, records)
    return len(records)


def review_entry_dict(result) -> dict:
    """The ``rm_review[metric]`` value for a :class:`~mmrole.eval.contract.JudgeResult`.
    Failures keep the raw reply and the reason, with ``score: null`` so readers count them as failures."""
    if result.ok:
        return {"review": result.review, "score": [float(result.score_a), float(result.score_b)]}
    return {"review": result.review, "score": None, "error": result.error, "attempts": result.attempts}


def write_reviews_file(
    path: PathLike,
    answers: Sequence[AnswerRecord],
    results: Mapping[tuple[str, str], Any],
    metrics: Sequence[str] = METRICS,
) -> int:
    """Write a reviews file: each answers record as read, plus ``rm_review``. Every (id, metric) must have a
    result (a missing one means the scoring run is incomplete: an error, not a silent gap)."""
    out = []
    missing = [(a.id, m) for a in answers for m in metrics if (a.id, m) not in results]
    if missing:
        raise EvalDataError(f"{path}: {len(missing)} (id, metric) result(s) missing, e.g. {missing[:3]}")
    for a in answers:
        rec = (
            dict(a.raw)
            if a.raw
            else {
                "id": a.id,
                "system": a.system,
                "image": a.image,
                "conversations": [
                    {"from": "user", "value": a.question},
                    {"from": "assistant", "value": a.reference, "answer": a.answer},
                ],
                "role": a.role,
                "script": a.script,
                "other_role": a.other_role,
            }
        )
        rec["rm_review"] = {m: review_entry_dict(results[(a.id, m)]) for m in metrics}
        out.append(rec)
    _dump_json(path, out)
    return len(out)


def format_results_csv(count: int, means: Mapping[str, Optional[float]], metrics: Sequence[str] = METRICS) -> str:
    """The published per-file CSV: header ``count,<metrics>`` and one row; floats as Python repr (what pandas
    writes), CRLF line ends. A metric without any valid score is written empty."""

    def fmt(v):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))

    header = ",".join(["count", *metrics])
    row = ",".join([str(int(count)), *(fmt(means.get(m)) for m in metrics)])
    return header + RESULTS_CSV_NEWLINE + row + RESULTS_CSV_NEWLINE


def write_results_csv(
    path: PathLike, count: int, means: Mapping[str, Optional[float]], metrics: Sequence[str] = METRICS
) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8", newline="") as f:
        f.write(format_results_csv(count, means, metrics))


def read_results_csv(path: PathLike) -> tuple[int, dict[str, Optional[float]]]:
    """``(count, {metric: mean})`` from a per-file results CSV."""
    import csv

    p = Path(path)
    try:
        with open(p, encoding="utf-8", newline="") as f:
            rows = [r for r in csv.reader(f) if r]
    except OSError as e:
        raise EvalDataError(f"{p}: cannot read ({e})") from e
    if len(rows) != 2 or not rows[0] or rows[0][0] != "count" or len(rows[0]) != len(rows[1]):
        raise EvalDataError(f"{p}: expected a header 'count,<metrics>' and one row of equal length")
    try:
        count = int(rows[1][0])
        means = {m: (float(v) if v != "" else None) for m, v in zip(rows[0][1:], rows[1][1:])}
    except ValueError as e:
        raise EvalDataError(f"{p}: non-numeric value ({e})") from e
    return count, means
