"""Teacher cost: measured (token usage of the replies) and estimated before a run (calls x assumed tokens)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import DialogueCounts, TeacherConfig

# Assumed tokens per call (prompt, completion) for a GPT-4o-class teacher; images at ~765 prompt tokens (a 512 px
# tile at high detail). Profiles of famous characters summarise ~1,500 tokens of reference text.
ASSUMED_TOKENS = {
    "meta_info": (250, 150),
    "profile": (1900, 900),
    "annotation": (900, 120),
    "comment": (1900, 350),
    "human-role": (1950, 800),
    "inter-role": (3000, 900),
}


def cost_usd(prompt_tokens: int, completion_tokens: int, teacher: TeacherConfig) -> float:
    return (
        prompt_tokens * teacher.price_input_per_mtok + completion_tokens * teacher.price_output_per_mtok
    ) / 1_000_000


@dataclass
class CostEstimate:
    calls: dict
    prompt_tokens: int
    completion_tokens: int
    usd: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def estimate_cost(
    n_characters: int,
    n_hypothetical: int,
    images_per_character: int,
    n_images: int,
    counts: DialogueCounts,
    teacher: TeacherConfig,
    n_cards: int = 0,
) -> CostEstimate:
    """Calls and cost of a run: profiles per character (+ meta info for hypothetical ones), one annotation per
    image, and ``counts`` dialogues of each type per (character, image); characters from a card need no profile."""
    per_type = counts.per_type()
    calls = {
        "meta_info": n_hypothetical,
        "profile": n_characters - n_cards,
        "annotation": n_images,
        **{t: n_characters * images_per_character * per_type[t] for t in per_type},
    }
    p = sum(calls[s] * ASSUMED_TOKENS[s][0] for s in calls)
    c = sum(calls[s] * ASSUMED_TOKENS[s][1] for s in calls)
    return CostEstimate(calls, p, c, round(cost_usd(p, c, teacher), 2))
