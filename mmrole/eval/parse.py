"""Parse a judge's reply into the score pair (A, B) that it must end with: ``[Scores]: (A, B)``.

Accepted (case-insensitive): ``[Scores]: (8, 9)``, ``[Scores]: 8, 9``, ``**Scores:** (8.5, 9)``,
``[Scores]: (8/10, 9/10)``, ``[Scores]: (Model A: 8, Model B: 9)``, full-width brackets/commas (``（8，9）``), any
text after the pair; without a scores marker, ``Model A: 8 ... Model B: 9`` (or "Assistant A"), or a last line
that is just ``(8, 9)``. A score must lie in [0, 10] and B must be positive (A / B is the metric).

The parser never guesses: a reply is a failure (re-asked, then recorded) when the pair is ambiguous — two numbers
without a separator (``[Scores]: 89``), a third number in the pair, several markers (or labels) giving different
pairs, two numbers split across sentences (``[Scores]: 8. Then 9``).
"""

from __future__ import annotations

import re
from typing import Optional

MIN_SCORE = 0.0
MAX_SCORE = 10.0

_NUM = r"([-+]?\d+(?:\.\d+)?)"
_DENOM = r"(?:\s*/\s*10(?:\.0+)?)?"  # "8/10"
_LABEL = r"(?:(?:model|assistant|response)\s*)?{x}(?:['’]s)?(?:\s*score)?\s*[:=：]\s*"
# An explicit separator is required: "8 9" or "89" is not a pair.
_SEP = r"\s*(?:[,，;；、]|\band\b|\bvs\.?)\s*"
_PAIR = re.compile(
    r"[\s:：=\-*_]*[(\[（【]?\s*"
    + "(?:"
    + _LABEL.format(x="a")
    + ")?"
    + _NUM
    + _DENOM
    + _SEP
    + "(?:"
    + _LABEL.format(x="b")
    + ")?"
    + _NUM
    + _DENOM
    # not followed by more digits or a third number: "(8, 95" or "(8, 9, 7)" is not a pair
    + r"(?![\d.]*\d)(?!\s*(?:/\s*\d|[,，;；、]\s*[-+]?\d))",
    re.IGNORECASE,
)
# A marker followed by a lone number (or digits run together): the pair is there but cannot be split.
_LONE = re.compile(r"[\s:：=\-*_]*[(\[（【]?\s*[-+]?\d", re.IGNORECASE)
# The contract's bracketed marker is tried first, then the bare word (e.g. "**Scores:** 8, 9").
# The bare word is not a marker where it is part of a label ("Model A's score: 7").
_MARKERS = (
    re.compile(r"\[\s*scores?\s*\]", re.IGNORECASE),
    re.compile(r"(?<!['’]s\s)(?<![ab]\s)\bscores?\b", re.IGNORECASE),
)
_NAMED = {
    x: re.compile(
        r"\b(?:model|assistant)\s*" + x + r"\b(?:['’]s)?(?:\s*score)?\s*[:=：\-]\s*\**\s*" + _NUM + _DENOM,
        re.IGNORECASE,
    )
    for x in ("a", "b")
}
_BARE_LAST_LINE = re.compile(r"^[(\[（]?\s*" + _NUM + _DENOM + r"\s*[,，]\s*" + _NUM + _DENOM + r"\s*[)\]）]?\.?$")


class ScoreParseError(ValueError):
    """A reply without a usable score pair; ``reason`` says why (the raw text is kept by the caller)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _same(pairs: list[tuple[str, str]]) -> bool:
    return len({(float(a), float(b)) for a, b in pairs}) == 1


def _find_pair(text: str) -> tuple[str, str]:
    """The one pair of ``text``; raises :class:`ScoreParseError` when there is none or more than one."""
    for marker in _MARKERS:
        pairs, lone = [], []
        for m in marker.finditer(text):
            pm = _PAIR.match(text, m.end())
            if pm:
                pairs.append((pm.group(1), pm.group(2)))
            elif _LONE.match(text, m.end()):
                lone.append(text[m.start() : m.end() + 12].strip())
        if lone:
            raise ScoreParseError(f"no score pair (ambiguous): no two separated scores after the marker in {lone[0]!r}")
        if pairs:
            if not _same(pairs):
                shown = ", ".join(f"({a}, {b})" for a, b in dict.fromkeys(pairs))
                raise ScoreParseError(f"ambiguous: several markers give different pairs {shown}")
            return pairs[-1]
    found = {x: list(dict.fromkeys(float(m.group(1)) for m in rx.finditer(text))) for x, rx in _NAMED.items()}
    if found["a"] and found["b"]:
        if len(found["a"]) > 1 or len(found["b"]) > 1:
            raise ScoreParseError(f"ambiguous: several scores for Model A {found['a']} or Model B {found['b']}")
        return str(found["a"][0]), str(found["b"][0])
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        bm = _BARE_LAST_LINE.match(lines[-1])
        if bm:
            return bm.group(1), bm.group(2)
    raise ScoreParseError("no score pair found")


def parse_scores(text: str, require_positive_b: bool = True) -> tuple[float, float]:
    """The (A, B) pair of a judge reply; raises :class:`ScoreParseError` when there is none or it is invalid.
    ``require_positive_b=False`` leaves the B = 0 check to the caller (swapped requests check after un-swapping)."""
    if not isinstance(text, str) or not text.strip():
        raise ScoreParseError("empty reply")
    pair = _find_pair(text)
    a, b = float(pair[0]), float(pair[1])
    for name, v in (("A", a), ("B", b)):
        if not MIN_SCORE <= v <= MAX_SCORE:
            raise ScoreParseError(f"score {name}={v:g} outside [{MIN_SCORE:g}, {MAX_SCORE:g}]")
    if b == 0 and require_positive_b:
        raise ScoreParseError("score B is 0 (A/B undefined)")
    return a, b


def check_pair(score) -> tuple[float, float]:
    """Validate a stored ``score`` field ``[A, B]`` the same way a parsed pair is validated."""
    if not isinstance(score, (list, tuple)) or len(score) != 2:
        raise ScoreParseError(f"score is not a pair: {score!r}")
    try:
        a, b = float(score[0]), float(score[1])
    except (TypeError, ValueError):
        raise ScoreParseError(f"score is not numeric: {score!r}") from None
    for name, v in (("A", a), ("B", b)):
        if not MIN_SCORE <= v <= MAX_SCORE:
            raise ScoreParseError(f"score {name}={v:g} outside [{MIN_SCORE:g}, {MAX_SCORE:g}]")
    if b == 0:
        raise ScoreParseError("score B is 0 (A/B undefined)")
    return a, b


def try_parse_scores(text: str, require_positive_b: bool = True) -> tuple[Optional[tuple[float, float]], Optional[str]]:
    """``((A, B), None)`` on success, ``(None, reason)`` otherwise."""
    try:
        return parse_scores(text, require_positive_b), None
    except ScoreParseError as e:
        return None, e.reason


# ------------------------------------------------------------------------------------ absolute (one score)
# "[Score]: 7", "**Score:** 7/10", "Score = 7.5": the marker is required (the parser never guesses a number).
_ONE_MARKERS = (
    re.compile(r"\[\s*score\s*\]", re.IGNORECASE),
    re.compile(r"(?<!['’]s\s)\bscore\b", re.IGNORECASE),
)
_ONE = re.compile(
    r"[\s:：=\-*_]*[(\[（【]?\s*" + _NUM + _DENOM + r"(?![\d.]*\d)(?!\s*(?:/\s*\d|[,，;；、]\s*[-+]?\d))",
    re.IGNORECASE,
)
_ONE_AFTER = re.compile(r"[\s:：=\-*_]*[(\[（【]?\s*[-+]?\d", re.IGNORECASE)


def parse_absolute(text: str, lo: float = 1.0, hi: float = 10.0) -> float:
    """The one score of an absolute-scale reply (``[Score]: 7``) in [lo, hi]; raises :class:`ScoreParseError`
    when there is none, when several markers give different scores, when the marker is followed by a pair
    (``[Score]: 7, 8``) or when the score is out of range."""
    if not isinstance(text, str) or not text.strip():
        raise ScoreParseError("empty reply")
    for marker in _ONE_MARKERS:
        found, bad = [], []
        for m in marker.finditer(text):
            om = _ONE.match(text, m.end())
            if om:
                found.append(float(om.group(1)))
            elif _ONE_AFTER.match(text, m.end()):
                bad.append(text[m.start() : m.end() + 12].strip())
        if bad:
            raise ScoreParseError(f"ambiguous: not one score after the marker in {bad[0]!r}")
        if found:
            if len(set(found)) > 1:
                raise ScoreParseError(f"ambiguous: several markers give different scores {sorted(set(found))}")
            v = found[-1]
            if not lo <= v <= hi:
                raise ScoreParseError(f"score {v:g} outside [{lo:g}, {hi:g}]")
            return v
    raise ScoreParseError("no score found")


def try_parse_absolute(text: str, lo: float = 1.0, hi: float = 10.0) -> tuple[Optional[float], Optional[str]]:
    """``(score, None)`` on success, ``(None, reason)`` otherwise."""
    try:
        return parse_absolute(text, lo, hi), None
    except ScoreParseError as e:
        return None, e.reason


def try_parse_pairwise(
    text: str, lo: float = 1.0, hi: float = 10.0
) -> tuple[Optional[tuple[float, float]], Optional[str]]:
    """The (A, B) pair of a pairwise reply (two candidates, both scored in [lo, hi]), or ``(None, reason)``."""
    pair, reason = try_parse_scores(text, require_positive_b=False)
    if pair is None:
        return None, reason
    for name, v in zip("AB", pair):
        if not lo <= v <= hi:
            return None, f"score {name}={v:g} outside [{lo:g}, {hi:g}]"
    return pair, None
