"""The judge prompt template (YAML), so the wording can be replaced without touching code."""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import yaml

from .metrics import METRICS

JUDGE_TEMPLATE_ENV = "MMROLE_JUDGE_TEMPLATE"
PACKAGED_TEMPLATE = "judge.yaml"
PROMPT_FIELDS = ("question", "answer_a", "answer_b", "metric", "metric_description", "role", "other_role", "script")
# A judge prompt without these cannot do its job.
REQUIRED_FIELDS = ("question", "answer_a", "answer_b", "metric_description")


class JudgeTemplateError(ValueError):
    """A judge template that is unreadable, misses keys or uses unknown placeholders."""


@dataclass(frozen=True)
class JudgeTemplate:
    """The wording of a judge call: system message, prompt and one description per metric."""

    system: str
    prompt: str
    metrics: dict = field(default_factory=dict)
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, d, source: str = "<dict>") -> JudgeTemplate:
        if not isinstance(d, dict):
            raise JudgeTemplateError(f"{source}: expected a mapping at the top level")
        for key in ("system", "prompt", "metrics"):
            if key not in d:
                raise JudgeTemplateError(f"{source}: missing key {key!r}")
        metrics = d["metrics"]
        if not isinstance(metrics, dict):
            raise JudgeTemplateError(f"{source}: 'metrics' must map metric name -> description")
        missing = [m for m in METRICS if not str(metrics.get(m) or "").strip()]
        unknown = [m for m in metrics if m not in METRICS]
        if missing or unknown:
            raise JudgeTemplateError(
                f"{source}: metrics missing {missing}, unknown {unknown}; expected {list(METRICS)}"
            )
        used = set()
        for _, name, _, _ in string.Formatter().parse(str(d["prompt"])):
            if name is not None:
                if name not in PROMPT_FIELDS:
                    raise JudgeTemplateError(
                        f"{source}: unknown placeholder {{{name}}} in prompt; allowed {PROMPT_FIELDS}"
                    )
                used.add(name)
        absent = [f for f in REQUIRED_FIELDS if f not in used]
        if absent:
            raise JudgeTemplateError(f"{source}: prompt lacks placeholder(s) {absent}")
        return cls(
            system=str(d["system"]),
            prompt=str(d["prompt"]),
            metrics={m: str(metrics[m]).strip() for m in METRICS},
            source=source,
        )

    def render(
        self,
        *,
        question: str,
        answer_a: str,
        answer_b: str,
        metric: str,
        role: str = "",
        other_role: str = "",
        script: str = "",
    ) -> str:
        """The judge prompt for one (sample, metric)."""
        if metric not in self.metrics:
            raise KeyError(f"{self.source}: no description for metric {metric!r}")
        return self.prompt.format(
            question=question,
            answer_a=answer_a,
            answer_b=answer_b,
            metric=metric,
            metric_description=self.metrics[metric],
            role=role or "the character",
            other_role=other_role or "the other party",
            script=script,
        )


def load_judge_template(path: Optional[Union[str, Path]] = None) -> JudgeTemplate:
    """Load ``path``, else $MMROLE_JUDGE_TEMPLATE, else the packaged ``mmrole/templates/judge.yaml``."""
    path = path or os.environ.get(JUDGE_TEMPLATE_ENV)
    if path:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise JudgeTemplateError(f"{p}: cannot read judge template ({e})") from e
        return JudgeTemplate.from_dict(data, str(p))
    text = resources.files("mmrole.templates").joinpath(PACKAGED_TEMPLATE).read_text(encoding="utf-8")
    return JudgeTemplate.from_dict(yaml.safe_load(text), f"mmrole/templates/{PACKAGED_TEMPLATE}")
