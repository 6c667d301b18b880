"""The 8 MMRole metrics, their 3 dimensions, and the names of the eval folders."""

from __future__ import annotations

from pathlib import Path

# Exact key strings of the published reviews' ``rm_review`` (order = published CSV column order).
METRICS: tuple[str, ...] = (
    "Instruction Adherence",
    "Fluency",
    "Coherency",
    "Image-Text Relevance",
    "Response Accuracy",
    "Personality Consistency",
    "Knowledge Consistency",
    "Tone Consistency",
)

DIMENSIONS: dict[str, tuple[str, ...]] = {
    "Fundamental Conversational Skills": ("Instruction Adherence", "Fluency", "Coherency"),
    "Multimodal Understanding": ("Image-Text Relevance", "Response Accuracy"),
    "Role-Playing Qualities": ("Personality Consistency", "Knowledge Consistency", "Tone Consistency"),
}

# Whole-conversation metrics (``mmrole eval converse``): scored once per conversation, over all its turns.
CONVERSATION_METRICS: tuple[str, ...] = (
    "Persona Consistency Across Turns",
    "Knowledge Consistency Across Turns",
    "Tone Consistency Across Turns",
    "Non-Repetition",
    "Late Image Grounding",
)

# Named metric sets a judge template may declare (``metric_set``); ``custom`` takes the template's own names.
METRIC_SETS: dict[str, tuple[str, ...]] = {"mmrole": METRICS, "conversation": CONVERSATION_METRICS}

METRIC_TO_DIMENSION: dict[str, str] = {m: d for d, ms in DIMENSIONS.items() for m in ms}

# Published eval layout: {set}_answers/<model>/<type>_test.json, {set}_reviews/..., {set}_results/.../*.csv
SETS: tuple[str, ...] = ("in-test", "out-test")
DIALOGUE_TYPES: tuple[str, ...] = ("comment", "human-role", "inter-role")
KINDS: tuple[str, ...] = ("answers", "reviews", "results")


def check_metrics(metrics) -> tuple[str, ...]:
    """Validate a metric selection (None = all 8); unknown names are an error, order follows METRICS."""
    if metrics is None:
        return METRICS
    chosen = list(dict.fromkeys(metrics))
    unknown = [m for m in chosen if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")
    return tuple(m for m in METRICS if m in chosen)


def eval_file(eval_dir, set_name: str, kind: str, model: str, dialogue_type: str, ext: str = "json"):
    """Path of one file of the published layout, e.g. ``in-test_reviews/<model>/comment_test.json``."""
    return Path(eval_dir) / f"{set_name}_{kind}" / model / f"{dialogue_type}_test.{ext}"
