"""Before a run starts Ray: the first rows' token lengths (:func:`mmrole.train.lengths.measure_lengths`, printed as
``mmrole data lengths`` prints them), and a refusal of a run that would train on nothing (every row rejected) or on
too little (rejected share over ``data.max_reject_ratio``).

Also the verdict on a finished run (:func:`reject_verdict`): a run that trained 0 steps, or whose rejected share
passes the cap, is not "ok", and the message names the main reject reason and the key to change.
"""

from __future__ import annotations

from typing import Optional

from mmrole.train.lengths import LengthReport

ADVICE = {
    "too_long": "raise model.max_length (or lower model.max_pixels to shrink image tokens)",
    "image": "fix or remove the unreadable images (see rejects.jsonl), or re-run `mmrole data prepare`",
    "encode": "see the reasons in rejects.jsonl (e.g. empty targets or control tokens in the text)",
}


class PreflightError(RuntimeError):
    """The run cannot usefully start; the message says why and what to change."""


def preflight_counts(rep: LengthReport, max_length: int) -> dict[str, int]:
    """Rows of a :class:`~mmrole.train.lengths.LengthReport` that training at ``max_length`` would reject, by stage
    (the stages of the run's rejects: ``too_long``, ``image``, ``encode``)."""
    counts = dict(rep.not_measured)
    too_long = rep.keeps(max_length)["rejected_too_long"]
    if too_long:
        counts["too_long"] = too_long
    return {k: v for k, v in counts.items() if v}


def check_preflight(rep: LengthReport, max_length: int, max_reject_ratio: float) -> None:
    """Raise :class:`PreflightError` when every checked row would be rejected, or more than the cap."""
    if rep.rows_in == 0:
        return
    by_stage = preflight_counts(rep, max_length)
    rejected = sum(by_stage.values())
    share = rejected / rep.rows_in
    if rejected == rep.rows_in or share > max_reject_ratio:
        reason = max(by_stage, key=by_stage.get)
        need = ""
        if by_stage.get("too_long"):
            longest = int(max(r.shortest for r in rep.rows))
            need = f" model.max_length={longest} would keep all {len(rep.rows)} encodable rows."
        raise PreflightError(
            f"{rejected} of the first {rep.rows_in} rows are rejected ({100 * share:.0f}% > "
            f"data.max_reject_ratio {100 * max_reject_ratio:.0f}%), mostly {reason!r}: {ADVICE.get(reason, '')}.{need}"
        ).with_traceback(None)


def reject_verdict(
    final_step: int, n_in: int, rejected_by_stage: dict[str, int], max_reject_ratio: float
) -> Optional[str]:
    """Why a finished run is not ok (None when it is): no step trained, or too many rows rejected."""
    n_rej = sum(rejected_by_stage.values())
    main = max(rejected_by_stage, key=rejected_by_stage.get) if rejected_by_stage else None
    hint = f" (mostly {main!r}: {ADVICE.get(main, '')})" if main else ""
    if final_step == 0:
        return f"trained 0 steps: {n_rej} of {n_in} rows rejected{hint}"
    if n_in and n_rej / n_in > max_reject_ratio:
        return (
            f"{n_rej} of {n_in} rows rejected ({100 * n_rej / n_in:.1f}% > data.max_reject_ratio "
            f"{100 * max_reject_ratio:.1f}%){hint}"
        )
    return None
