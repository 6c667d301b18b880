"""The reward of a GRPO rollout (pure: no torch, no Ray).

A reward is a weighted sum of components:

* ``judge``: the MMRole-Eval ratio, computed as the eval computes it (:mod:`mmrole.eval.parse`,
  :mod:`mmrole.eval.aggregate`): for each chosen metric the judge compares the rollout (Model A) with the ground
  truth (Model B) and the score is ``A / B``; the component is the mean over the chosen metrics. A metric whose
  reply did not parse (or that failed otherwise) makes the whole reward a *failure* with its reason, never a 0:
  the rollout is left out of its group and of the loss, and counted.
* rule rewards: ``language`` (1 when the reply is written in the character's language, else 0), ``length``
  (1 inside the character band, falling linearly outside), ``generic`` (-1 for an empty, repetitive or stock
  reply, else 0: a penalty with a positive weight) and ``style`` (the share of the reply's characters covered by
  configured style tokens, capped at 1: a dense, learnable target for tests and demos).

Weights live in :class:`RewardSettings` (``grpo.reward`` in the job config).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from mmrole.eval.contract import JudgeRequest, JudgeResult
from mmrole.eval.metrics import METRICS, check_metrics

RULES = ("language", "length", "generic", "style")
DEFAULT_GENERIC_PHRASES = (
    "as an ai",
    "i am an ai",
    "i'm an ai",
    "language model",
    "i cannot help",
    "i can't help",
    "i don't know",
    "sorry, i",
)
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class RuleSettings:
    """Weights of the rule rewards (0 = off) and their parameters."""

    language: float = 0.0
    length: float = 0.0
    length_band: list[int] = field(default_factory=lambda: [20, 600])  # [min, max] reply characters
    generic: float = 0.0  # penalty weight (the component is -1 for a generic reply)
    generic_phrases: list[str] = field(default_factory=lambda: list(DEFAULT_GENERIC_PHRASES))
    min_distinct_words: int = 3  # fewer distinct words = generic
    style: float = 0.0
    style_tokens: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.length_band) != 2 or not 0 < self.length_band[0] <= self.length_band[1]:
            raise ValueError(f"rules.length_band must be [min, max] with 0 < min <= max, got {self.length_band}")
        if self.style and not [t for t in self.style_tokens if t]:
            raise ValueError("rules.style: a style weight needs rules.style_tokens")
        for k in RULES:
            if getattr(self, k) < 0:
                raise ValueError(f"rules.{k}: weights must be >= 0 (generic is already a penalty)")


@dataclass
class RewardSettings:
    """What a rollout's reward is made of: the judge ratio on ``metrics`` (weight ``judge``) plus rule rewards."""

    judge: float = 1.0  # weight of the MMRole-Eval ratio (0 = no judge calls)
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    rules: RuleSettings = field(default_factory=RuleSettings)

    def __post_init__(self):
        if self.judge < 0:
            raise ValueError("reward.judge: must be >= 0")
        try:
            self.metrics = list(check_metrics(self.metrics))
        except ValueError as e:
            raise ValueError(f"reward.metrics: {e}") from None
        if self.judge == 0 and not any(getattr(self.rules, k) for k in RULES):
            raise ValueError("reward: every weight is 0 (set reward.judge or a reward.rules weight)")

    @property
    def uses_judge(self) -> bool:
        return self.judge > 0


@dataclass
class RolloutReward:
    """One rollout's reward: ``value`` (None for a failure, with ``error``) and its weighted-in components."""

    value: Optional[float]
    components: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.value is not None


# ----------------------------------------------------------------------------------------------- rules


def reply_language(text: str) -> Optional[str]:
    """``Chinese`` or ``English`` by which script has more characters in ``text``; None for neither."""
    cjk, latin = len(_CJK.findall(text or "")), len(_LATIN.findall(text or ""))
    if cjk == 0 and latin == 0:
        return None
    return "Chinese" if cjk >= latin else "English"


def character_language(meta: Mapping) -> str:
    """The character's language as the data reader infers it (:func:`mmrole.data.records.infer_language`)."""
    from mmrole.data.records import infer_language

    return meta.get("language") or infer_language(str(meta.get("role", "")), str(meta.get("system", "")))


def length_score(n_chars: int, band: Sequence[int]) -> float:
    """1 inside ``[lo, hi]``; ``n / lo`` below; ``1 - (n - hi) / hi`` above (floored at 0)."""
    lo, hi = band
    if n_chars < lo:
        return n_chars / lo
    if n_chars > hi:
        return max(0.0, 1.0 - (n_chars - hi) / hi)
    return 1.0


def is_generic(text: str, rules: RuleSettings) -> bool:
    """Empty, fewer than ``min_distinct_words`` distinct words, or a stock phrase."""
    low = (text or "").strip().lower()
    if len(set(_WORD.findall(low))) < rules.min_distinct_words:
        return True
    return any(p and p.lower() in low for p in rules.generic_phrases)


def style_share(text: str, tokens: Sequence[str]) -> float:
    """Share of ``text``'s characters covered by (non-overlapping, case-insensitive) occurrences of ``tokens``."""
    low = (text or "").lower()
    if not low:
        return 0.0
    pattern = re.compile("|".join(re.escape(t.lower()) for t in sorted(tokens, key=len, reverse=True) if t))
    covered = sum(m.end() - m.start() for m in pattern.finditer(low))
    return min(1.0, covered / len(low))


def rule_components(reply: str, meta: Mapping, rules: RuleSettings) -> dict[str, float]:
    """The unweighted value of each rule with a non-zero weight."""
    out: dict[str, float] = {}
    if rules.language:
        out["language"] = float(reply_language(reply) == character_language(meta))
    if rules.length:
        out["length"] = length_score(len(reply.strip()), rules.length_band)
    if rules.generic:
        out["generic"] = -1.0 if is_generic(reply, rules) else 0.0
    if rules.style:
        out["style"] = style_share(reply, rules.style_tokens)
    return out


# ----------------------------------------------------------------------------------------------- judge


def judge_requests(rollout_id: str, reply: str, meta: Mapping, metrics: Sequence[str]) -> list[JudgeRequest]:
    """One request per chosen metric comparing ``reply`` (Model A) with the sample's ground truth (Model B).

    ``meta`` holds the prompt's sample fields (``user_text``, ``target``, ``image``, ``role``, ...);
    ``rollout_id`` names the rollout (e.g. ``<sample id>#g<k>``) so results map back."""
    return [
        JudgeRequest(
            sample_id=rollout_id,
            metric=m,
            question=str(meta.get("user_text", "")),
            answer=reply,
            reference=str(meta.get("target", "")),
            image=str(meta.get("image", "")),
            role=str(meta.get("role", "")),
            other_role=str(meta.get("other_role", "")),
            script=str(meta.get("script", "")),
            set_name=str(meta.get("set_name", "")),
            dialogue_type=str(meta.get("dialogue_type", "")),
        )
        for m in metrics
    ]


def judge_ratio(results: Sequence[JudgeResult], metrics: Sequence[str]) -> tuple[Optional[float], Optional[str]]:
    """``(mean of A / B over metrics, None)``, or ``(None, reason)`` when a metric has no usable result."""
    by_metric = {r.metric: r for r in results}
    ratios = []
    for m in metrics:
        r = by_metric.get(m)
        if r is None:
            return None, f"{m}: no judge result"
        if not r.ok or r.ratio is None:
            return None, f"{m}: {r.error or 'failed'}"
        ratios.append(r.ratio)
    return sum(ratios) / len(ratios), None


# ----------------------------------------------------------------------------------------------- reward


def rollout_reward(
    reply: Optional[str],
    meta: Mapping,
    settings: RewardSettings,
    judge_results: Optional[Sequence[JudgeResult]] = None,
    rollout_error: Optional[str] = None,
) -> RolloutReward:
    """The reward of one rollout. ``reply`` None (or ``rollout_error``) is a failed rollout; with a judge weight,
    ``judge_results`` are the rollout's results (an empty reply is never sent to the judge: a failure, as the
    eval excludes empty answers)."""
    if rollout_error is not None or reply is None:
        return RolloutReward(None, error=f"rollout: {rollout_error or 'no reply'}")
    comps = rule_components(reply, meta, settings.rules)
    if settings.uses_judge:
        if not reply.strip():
            return RolloutReward(None, comps, "judge: empty reply (not scored)")
        ratio, err = judge_ratio(judge_results or [], settings.metrics)
        if err is not None:
            return RolloutReward(None, comps, f"judge: {err}")
        comps["judge"] = ratio
    weights = {"judge": settings.judge, **{k: getattr(settings.rules, k) for k in RULES}}
    value = sum(weights[k] * v for k, v in comps.items())
    return RolloutReward(float(value), comps)


def failure_reason_key(error: str) -> str:
    """A short, countable form of a failure reason (the part before any reply text)."""
    head = error.split(":", 2)
    key = ":".join(head[:2]).strip() if len(head) > 1 else error
    return key[:120]
