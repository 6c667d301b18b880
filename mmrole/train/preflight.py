"""Before a run starts Ray: encode the first rows on the driver, print their token lengths, and refuse a run that
would train on nothing (every row rejected) or on too little (rejected share over ``data.max_reject_ratio``).

Also the verdict on a finished run (:func:`reject_verdict`): a run that trained 0 steps, or whose rejected share
passes the cap, is not "ok", and the message names the main reject reason and the key to change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

ADVICE = {
    "too_long": "raise model.max_length (or lower model.max_pixels to shrink image tokens)",
    "image": "fix or remove the unreadable images (see rejects.jsonl), or re-run `mmrole data prepare`",
    "encode": "see the reasons in rejects.jsonl (e.g. empty targets or control tokens in the text)",
}


class PreflightError(RuntimeError):
    """The run cannot usefully start; the message says why and what to change."""


@dataclass
class LengthReport:
    """Token lengths of the rows checked, and why the others were rejected."""

    checked: int = 0
    kept: int = 0
    text_tokens: list[int] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    rejected_by_stage: dict[str, int] = field(default_factory=dict)
    too_long_lengths: list[int] = field(default_factory=list)
    max_length: int = 0

    @property
    def rejected(self) -> int:
        return self.checked - self.kept

    @property
    def main_reason(self) -> Optional[str]:
        return max(self.rejected_by_stage, key=self.rejected_by_stage.get) if self.rejected_by_stage else None

    def lines(self) -> list[str]:
        def pct(xs: list[int]) -> str:
            if not xs:
                return "n/a"
            p = np.percentile(np.asarray(xs), [50, 90, 99, 100]).round().astype(int)
            return f"p50 {p[0]} p90 {p[1]} p99 {p[2]} max {p[3]}"

        total = [t + i for t, i in zip(self.text_tokens, self.image_tokens)]
        out = [
            f"token lengths of the first {self.checked} rows (max_length {self.max_length}): total {pct(total)}; "
            f"text {pct(self.text_tokens)}; image {pct(self.image_tokens)}",
            f"kept {self.kept}/{self.checked}; rejected {self.rejected} {dict(self.rejected_by_stage) or ''}".rstrip(),
        ]
        if self.too_long_lengths:
            need = int(np.max(self.too_long_lengths))
            out.append(
                f"too long: {len(self.too_long_lengths)} row(s) of up to {need} tokens; model.max_length={need} "
                "would keep them all"
            )
        return out


def length_report(encoder, indices: list[int]) -> LengthReport:
    """Encode ``indices`` with a :class:`~mmrole.train.row_encoder.RowEncoder` (rejects are not written)."""
    rep = LengthReport(max_length=encoder.encoder.max_length)
    stages: Counter = Counter()
    for lo in range(0, len(indices), 32):
        res = encoder.encode_rows(indices[lo : lo + 32])
        rep.checked += len(res.samples) + len(res.rejected)
        rep.kept += len(res.samples)
        for s in res.samples:
            rep.text_tokens.append(int(s["num_text_tokens"]))
            rep.image_tokens.append(int(s["num_image_tokens"]))
        for r in res.rejected:
            stages[r["stage"]] += 1
            if r["stage"] == "too_long" and r.get("length"):
                rep.too_long_lengths.append(int(r["length"]))
    rep.rejected_by_stage = dict(stages)
    return rep


def check_preflight(rep: LengthReport, max_reject_ratio: float) -> None:
    """Raise :class:`PreflightError` when every checked row is rejected, or more than the cap."""
    if rep.checked == 0:
        return
    share = rep.rejected / rep.checked
    if rep.kept == 0 or share > max_reject_ratio:
        reason = rep.main_reason or "?"
        raise PreflightError(
            f"{rep.rejected} of the first {rep.checked} rows are rejected ({100 * share:.0f}% > "
            f"data.max_reject_ratio {100 * max_reject_ratio:.0f}%), mostly {reason!r}: {ADVICE.get(reason, '')}. "
            + (" ".join(rep.lines()[2:]) if rep.too_long_lengths else "")
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
