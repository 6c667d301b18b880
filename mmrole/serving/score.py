"""``/v1/score``: the judge app's request (fanned out per metric) and response, and the client-side reader."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

from mmrole.data.records import Character
from mmrole.data.templates import RoleplayTemplate
from mmrole.eval.contract import B_ZERO_ERROR, JudgeRequest, JudgeResult
from mmrole.eval.metrics import METRICS, check_metrics
from mmrole.serving.errors import bad_request
from mmrole.serving.fields import TextBudget, field_value
from mmrole.serving.images import REQUEST_IMAGE, decode_image_url, probe_image
from mmrole.serving.roleplay import parse_roleplay_fields, roleplay_sample
from mmrole.serving.settings import RequestLimits


@dataclass
class ScoreInput:
    """A validated ``/v1/score`` request: one judge request per metric, sharing one image."""

    requests: list[JudgeRequest]
    image: bytes
    max_retries: int


def parse_score(
    body: Mapping,
    limits: RequestLimits,
    characters: Mapping[str, Character],
    template: Optional[RoleplayTemplate],
    max_retries_cap: int,
) -> ScoreInput:
    """Validate a score request. The question is given as text (``question``) or as role-play fields
    (``sample``: character, other, history, message, image_info), rendered with the role-play template."""
    budget = TextBudget(limits)
    sample_id = field_value(body, "sample_id", str, "sample_id", default="request")[:200]
    answer = budget.take(field_value(body, "answer", str, "answer", required=True), "answer")
    reference = budget.take(field_value(body, "reference", str, "reference", required=True), "reference")
    metrics_in = field_value(body, "metrics", list, "metrics")
    if metrics_in is not None:
        if not metrics_in or not all(isinstance(m, str) for m in metrics_in):
            raise bad_request("metrics", "'metrics' must be a non-empty array of metric names", "wrong_type")
        unknown = [m for m in dict.fromkeys(metrics_in) if m not in METRICS]
        if unknown:
            raise bad_request("metrics", f"unknown metric(s) {unknown[:8]}; known: {list(METRICS)}", "unknown_metric")
    metrics = check_metrics(metrics_in)
    role = field_value(body, "role", str, "role", default="")
    other_role = field_value(body, "other_role", str, "other_role", default="")
    script = field_value(body, "script", str, "script", default="")
    question = field_value(body, "question", str, "question")
    sample = field_value(body, "sample", dict, "sample")
    if (question is None) == (sample is None):
        raise bad_request(
            "question", "give exactly one of 'question' (text) or 'sample' (role-play fields)", "missing_field"
        )
    if question is not None:
        budget.take(question, "question")
    else:
        if template is None:
            raise bad_request("sample", "this server has no role-play template; send 'question'", "unsupported")
        rp = parse_roleplay_fields(sample, limits, characters, prefix="sample.", budget=budget)
        s = roleplay_sample(rp, template, sample_id)
        question = s.user_text
        role, other_role, script = role or s.role, other_role or s.other_role, script or s.script
    swapped = field_value(body, "swapped", bool, "swapped", default=False)
    retries = field_value(body, "max_retries", int, "max_retries", default=max_retries_cap)
    if not 0 <= retries <= max_retries_cap:
        raise bad_request("max_retries", f"'max_retries' must be between 0 and {max_retries_cap}", "invalid_value")
    if body.get("image") is None:
        raise bad_request("image", "missing required field 'image' (a data:image/...;base64 URL)", "missing_image")
    data = decode_image_url(body["image"], limits, "image")
    probe_image(data, limits, "image")
    reqs = [
        JudgeRequest(
            sample_id=sample_id,
            metric=m,
            question=question,
            answer=answer,
            reference=reference,
            image=REQUEST_IMAGE,
            role=role,
            other_role=other_role,
            script=script,
            set_name=field_value(body, "set_name", str, "set_name", default=""),
            dialogue_type=field_value(body, "dialogue_type", str, "dialogue_type", default=""),
            swapped=swapped,
        )
        for m in metrics
    ]
    return ScoreInput(requests=reqs, image=data, max_retries=retries)


def parse_status(result: JudgeResult) -> str:
    """``ok``, ``zero_reference`` (parsed, but B = 0) or ``unparsable``."""
    if result.ok:
        return "ok"
    return "zero_reference" if result.error == B_ZERO_ERROR else "unparsable"


def score_response(sample_id: str, judge: str, results: Sequence[JudgeResult]) -> dict:
    """Per metric: review text, score pair, ratio A/B and parse status (plus counts)."""
    items = []
    for r in results:
        items.append(
            {
                "metric": r.metric,
                "ok": r.ok,
                "parse_status": parse_status(r),
                "review": r.review,
                "score": [r.score_a, r.score_b] if r.ok else None,
                "ratio": r.ratio,
                "error": r.error,
                "attempts": r.attempts,
                "swapped": r.swapped,
            }
        )
    n_ok = sum(1 for r in results if r.ok)
    return {
        "object": "score",
        "sample_id": sample_id,
        "judge": judge,
        "results": items,
        "parsed": n_ok,
        "failed": len(results) - n_ok,
    }


def result_from_item(sample_id: str, item: Mapping, judge: str, elapsed_s: float = 0.0) -> JudgeResult:
    """A :class:`JudgeResult` from one entry of a ``/v1/score`` response (client side)."""
    ok = bool(item.get("ok"))
    score = item.get("score") or [None, None]
    return JudgeResult(
        sample_id=sample_id,
        metric=item["metric"],
        ok=ok,
        score_a=float(score[0]) if ok else None,
        score_b=float(score[1]) if ok else None,
        review=item.get("review") or "",
        error=item.get("error"),
        attempts=int(item.get("attempts") or 1),
        swapped=bool(item.get("swapped")),
        judge=judge,
        elapsed_s=elapsed_s,
    )
