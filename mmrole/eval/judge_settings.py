"""The judge settings file ``judge_results/<model>.judge.json``: which judge scored a model and, per metric, how
its score pairs were read (``constrained``: decoded under the score-line mask of ``judge.constrained_scores``;
``free``: parsed from the judge's free review). Written by the scoring job, named in the report."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from .cache_keys import digest, judge_identity
from .metrics import METRICS

SUFFIX = ".judge.json"


def settings_path(store_path: Union[str, Path]) -> Path:
    """The settings file next to a results store (``<model>.jsonl`` -> ``<model>.judge.json``)."""
    p = Path(store_path)
    return p.with_name(p.name[: -len(".jsonl")] + SUFFIX if p.name.endswith(".jsonl") else p.name + SUFFIX)


def judge_settings_record(settings: Any, metrics: Iterable[str], previous: Optional[dict] = None) -> dict:
    """The record for a :class:`mmrole.eval.job_config.JudgeSettings` judge that scored ``metrics``; the metrics
    of ``previous`` (an earlier record) not scored now are kept."""
    ident = judge_identity(settings)
    how = "constrained" if getattr(settings, "constrained_scores", False) else "free"
    per_metric = dict((previous or {}).get("metrics") or {})
    per_metric.update({m: {"score_pair": how, "judge_digest": digest(ident)} for m in metrics})
    return {
        "judge": ident,
        "judge_digest": digest(ident),
        "constrained_scores": how == "constrained",
        "metrics": per_metric,
    }


def write_judge_settings(store_path: Union[str, Path], settings: Any, metrics: Iterable[str]) -> Path:
    """Write (merge into) the settings file of the store at ``store_path``; returns its path."""
    path = settings_path(store_path)
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = None
    record = judge_settings_record(settings, metrics, previous)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


def read_judge_settings(eval_dir: Union[str, Path], models: Sequence[str]) -> dict:
    """{model: record} for the models with a settings file under ``<eval_dir>/judge_results/``."""
    out = {}
    for m in models:
        rel = f"judge_results/{m}{SUFFIX}"  # named relative to the eval dir: the report moves with its folder
        try:
            out[m] = {**json.loads((Path(eval_dir) / rel).read_text(encoding="utf-8")), "path": rel}
        except (OSError, ValueError):
            continue
    return out


def render_judges(judges: dict, short: dict) -> list[str]:
    """Report lines: per model, how the score pairs of each metric were read and where the settings are."""
    if not judges:
        return []
    lines = ["", "### Judge", ""]
    for model, rec in judges.items():
        per = rec.get("metrics") or {}
        ident = rec.get("judge") or {}
        name = ident.get("model_path") or ident.get("model") or ident.get("url") or "?"
        parts = []
        for how, label in (
            ("constrained", "constrained score decoding (judge.constrained_scores)"),
            ("free", "parsed from the free review text"),
        ):
            ms = [m for m in METRICS if (per.get(m) or {}).get("score_pair") == how]
            if ms:
                which = "all 8 metrics" if len(ms) == len(METRICS) else ", ".join(short.get(m, m) for m in ms)
                parts.append(f"{label} for {which}")
        how_s = "; ".join(parts) or "no metric recorded"
        lines.append(f"- {model}: judge {ident.get('kind', '?')} {name}; score pair {how_s} (settings: {rec['path']})")
    return lines
