"""The judge contract: one request per (sample, metric), one result per request, and the Judge protocol.

A judge sees the image, the whole rendered question, Model A's answer (the model under test) and Model B's
answer (the ground truth), and replies with a short comparison ending in ``[Scores]: (A, B)``. With
``swapped=True`` the two answers are shown the other way round (position-bias check); results are always stored
un-swapped (``score_a`` = the model under test), so the two runs can be compared directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional, Protocol, runtime_checkable

from mmrole.data.records import TEST_SETS, Sample

from .formats import AnswerRecord
from .metrics import check_metrics
from .parse import try_parse_absolute, try_parse_pairwise, try_parse_scores
from .template import JudgeTemplate
from .template_loader import load_judge_template

Key = tuple[str, str]  # (sample_id, metric)
# Error of a reply that parsed but gave the reference 0: a judgement, recorded as a failure, not re-asked.
B_ZERO_ERROR = "score of the reference (B) is 0: A/B undefined"
# Set folder name (in-test / out-test) -> data group; derived from the one mapping in mmrole.data.records.
SET_TO_GROUP = {set_name: group for group, set_name in TEST_SETS.items()}


@dataclass
class JudgeRequest:
    """One judge call: compare ``answer`` (Model A) with ``reference`` (Model B) on ``metric``."""

    sample_id: str
    metric: str
    question: str
    answer: str
    reference: str
    image: str  # relative to the images root
    role: str = ""
    other_role: str = ""
    script: str = ""
    set_name: str = ""
    dialogue_type: str = ""
    swapped: bool = False  # show the reference as Model A (position-bias check)
    image_bytes: Optional[bytes] = field(default=None, repr=False)  # embedded image, used instead of the file
    # What the reply is parsed as (the template's scale.kind, checked when rendered): "reference" (A vs the ground
    # truth B, the MMRole-Eval pair), "absolute" (one score of ``answer``) or "pairwise" (``answer`` vs another
    # candidate in ``reference``); scores must lie in [scale_min, scale_max].
    scale: str = "reference"
    scale_min: float = 0.0
    scale_max: float = 10.0

    @property
    def key(self) -> Key:
        return (self.sample_id, self.metric)

    def presented(self) -> tuple[str, str]:
        """(what the judge sees as Model A, as Model B)."""
        return (self.reference, self.answer) if self.swapped else (self.answer, self.reference)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JudgeRequest:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class JudgeResult:
    """The outcome of one request. ``score_a`` is always the model under test, ``score_b`` the reference
    (un-swapped). A failure has ``ok=False``, no scores, the raw reply in ``review`` and the reason in ``error``."""

    sample_id: str
    metric: str
    ok: bool
    score_a: Optional[float] = None
    score_b: Optional[float] = None
    review: str = ""
    error: Optional[str] = None
    attempts: int = 1  # judge replies asked for (1 + re-asks)
    swapped: bool = False
    judge: str = ""
    elapsed_s: float = 0.0
    created: float = field(default_factory=time.time)
    cache_key: str = ""  # digest of judge, template, generation parameters and request text (see cache_keys)

    @property
    def key(self) -> Key:
        return (self.sample_id, self.metric)

    @property
    def ratio(self) -> Optional[float]:
        """The per-(sample, metric) score A / B (None for a failure or an absolute score)."""
        return self.score_a / self.score_b if self.ok and self.score_b else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JudgeResult:
        missing = [k for k in ("sample_id", "metric", "ok") if k not in d]
        if missing:
            raise KeyError(f"result lacks {missing}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@runtime_checkable
class Judge(Protocol):
    """Anything that scores requests: a local VLM, an OpenAI-compatible API, our own /v1/score endpoint.

    ``score_batch`` returns one result per request, in order, with the same keys. Per-request problems
    (unparsable replies after re-asks, HTTP errors after retries, unreadable images) become failure results;
    only configuration problems (bad credentials, unknown model) raise.
    """

    name: str

    def score_batch(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]: ...


def request_for(a: AnswerRecord, metric: str, swapped: bool = False) -> JudgeRequest:
    """The judge request comparing answer record ``a`` with its reference on ``metric``."""
    return JudgeRequest(
        sample_id=a.id,
        metric=metric,
        question=a.question,
        answer=a.answer,
        reference=a.reference,
        image=a.image,
        role=a.role,
        other_role=a.other_role,
        script=a.script,
        set_name=a.set_name,
        dialogue_type=a.dialogue_type,
        swapped=swapped,
    )


def expand_requests(
    answers: Iterable[AnswerRecord], metrics: Optional[Sequence[str]] = None, swapped: bool = False
) -> list[JudgeRequest]:
    """One request per (answer, metric), in answer order then METRICS order. Sample ids must be unique."""
    metrics = check_metrics(metrics)
    out: list[JudgeRequest] = []
    seen: dict[str, str] = {}
    for a in answers:
        if a.id in seen:
            raise ValueError(
                f"duplicate sample id {a.id!r} (in {seen[a.id] or '?'} and {a.source or '?'}): "
                "(sample_id, metric) keys would collide"
            )
        seen[a.id] = a.source
        out.extend(request_for(a, m, swapped) for m in metrics)
    return out


def build_judge_sample(request: JudgeRequest, template: Optional[JudgeTemplate] = None) -> Sample:
    """The judge call as a :class:`Sample` (user_text = judge prompt), for any VLM or for RM training data."""
    template = template or load_judge_template()
    if template.scale.kind != request.scale:
        raise ValueError(
            f"{request.sample_id}: a {request.scale!r} request rendered with {template.source}, whose scale is "
            f"{template.scale.kind!r}"
        )
    shown_a, shown_b = request.presented()
    prompt = template.render(
        question=request.question,
        answer_a=shown_a,
        answer_b=shown_b,
        metric=request.metric,
        role=request.role,
        other_role=request.other_role,
        script=request.script,
    )
    return Sample(
        id=f"{request.sample_id}::{request.metric}" + ("::swapped" if request.swapped else ""),
        system=template.render_system(
            role=request.role, other_role=request.other_role, script=request.script, metric=request.metric
        ),
        user_text=prompt,
        image=request.image,
        target="",
        role=request.role,
        other_role=request.other_role,
        script=request.script,
        dialogue_type="judge",
        k=0,
        group=SET_TO_GROUP.get(request.set_name, "in-distribution"),
    )


def rm_training_sample(request: JudgeRequest, result: JudgeResult, template: Optional[JudgeTemplate] = None) -> Sample:
    """A reward-model training example: the judge prompt and the judge's (successful) review as target."""
    if not result.ok:
        raise ValueError(f"{result.key}: a failed judgement is not training data ({result.error})")
    s = build_judge_sample(request, template)
    s.target = result.review
    return s


def result_from_reply(
    request: JudgeRequest, reply: str, *, attempts: int = 1, judge: str = "", elapsed_s: float = 0.0
) -> JudgeResult:
    """Parse a reply into a result, un-swapping the pair for swapped requests; unparsable -> failure."""
    if request.scale == "absolute":
        score, reason = try_parse_absolute(reply, request.scale_min, request.scale_max)
        if score is None:
            return failure(
                request, reason or "unparsable", review=reply, attempts=attempts, judge=judge, elapsed_s=elapsed_s
            )
        return JudgeResult(
            sample_id=request.sample_id,
            metric=request.metric,
            ok=True,
            score_a=score,
            review=reply,
            attempts=attempts,
            judge=judge,
            elapsed_s=elapsed_s,
        )
    if request.scale == "pairwise":
        pair, reason = try_parse_pairwise(reply, request.scale_min, request.scale_max)
    else:
        pair, reason = try_parse_scores(reply, require_positive_b=False)
    if pair is None:
        return failure(
            request, reason or "unparsable", review=reply, attempts=attempts, judge=judge, elapsed_s=elapsed_s
        )
    a, b = pair
    if request.swapped:  # the judge saw the reference as A
        a, b = b, a
    if b == 0 and request.scale == "reference":
        return failure(request, B_ZERO_ERROR, review=reply, attempts=attempts, judge=judge, elapsed_s=elapsed_s)
    return JudgeResult(
        sample_id=request.sample_id,
        metric=request.metric,
        ok=True,
        score_a=a,
        score_b=b,
        review=reply,
        attempts=attempts,
        swapped=request.swapped,
        judge=judge,
        elapsed_s=elapsed_s,
    )


def failure(
    request: JudgeRequest, error: str, *, review: str = "", attempts: int = 0, judge: str = "", elapsed_s: float = 0.0
) -> JudgeResult:
    return JudgeResult(
        sample_id=request.sample_id,
        metric=request.metric,
        ok=False,
        review=review or "",
        error=error,
        attempts=attempts,
        swapped=request.swapped,
        judge=judge,
        elapsed_s=elapsed_s,
    )
