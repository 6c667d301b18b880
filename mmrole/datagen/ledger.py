"""Counts of a generation run: in / out / rejected (with reasons) per stage, every reject, the teacher's usage."""

from __future__ import annotations

from dataclasses import dataclass, field

STAGE_ORDER = ("images", "meta_info", "profile", "annotation", "dialogues", "near_duplicates", "judge", "test_split")


@dataclass
class StageCounts:
    items_in: int = 0
    out: int = 0
    rejected: int = 0
    rejected_by_reason: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "in": self.items_in,
            "out": self.out,
            "rejected": self.rejected,
            "rejected_by_reason": self.rejected_by_reason,
        }


@dataclass
class RunLedger:
    """Counts per stage, every reject with its reason, the teacher's token usage."""

    stages: dict = field(default_factory=lambda: {s: StageCounts() for s in STAGE_ORDER})
    rejects: list = field(default_factory=list)
    usage: dict = field(default_factory=dict)  # "teacher" / "judge" -> requests, tokens, cache hits

    def count(self, who: str, **add) -> None:
        u = self.usage.setdefault(
            who, {"requests": 0, "http_attempts": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0}
        )
        for k, v in add.items():
            u[k] += v

    def take(self, stage: str) -> None:
        self.stages[stage].items_in += 1

    def accept(self, stage: str) -> None:
        self.stages[stage].out += 1

    def reject(self, stage: str, code: str, reason: str, character: str = "", image: str = "", dtype: str = "") -> None:
        c = self.stages[stage]
        c.rejected += 1
        c.rejected_by_reason[code] = c.rejected_by_reason.get(code, 0) + 1
        self.rejects.append(
            {"stage": stage, "character": character, "image": image, "type": dtype, "code": code, "reason": reason}
        )
