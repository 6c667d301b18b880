"""The judge prompt template (YAML), so the wording can be replaced without touching code.

A template has a ``system`` message, a ``prompt`` and one description per metric, all format strings over the
placeholders below, plus an optional ``roles`` section saying how a character is named in judge text (with its
script, or as a hypothetical character; how the curious human partner is named). Templates are read from files by
:mod:`mmrole.eval.template_loader`, which also accepts the original MMRole judging script (``eval/RM_review.py``).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import yaml

from .metrics import METRIC_SETS

JUDGE_TEMPLATE_ENV = "MMROLE_JUDGE_TEMPLATE"
PACKAGED_TEMPLATE = "judge.yaml"
# Placeholders that depend on the sample's characters only; usable in the system message and metric descriptions.
ROLE_FIELDS = ("role", "other_role", "script", "role_with_script", "other_role_with_script", "other_role_referent")
DESCRIPTION_FIELDS = ("metric", *ROLE_FIELDS)
SYSTEM_FIELDS = DESCRIPTION_FIELDS
PROMPT_FIELDS = ("question", "answer_a", "answer_b", "metric_description", *DESCRIPTION_FIELDS)
# A judge prompt without these cannot do its job.
REQUIRED_FIELDS = ("question", "answer_a", "answer_b", "metric_description")
NAME_FIELDS = ("name", "script")  # placeholders of the `roles` patterns
# How a reply is scored (``scale.kind``): ``reference`` = the answer (A) against the ground truth (B), a pair, B > 0
# (MMRole-Eval); ``absolute`` = one score for one reply (no ground truth); ``pairwise`` = two candidates, a pair.
SCALE_KINDS = ("reference", "absolute", "pairwise")


@dataclass(frozen=True)
class Scale:
    """What a template asks the judge for: ``kind`` (see SCALE_KINDS) and the range of each score."""

    kind: str = "reference"
    min: float = 0.0
    max: float = 10.0

    @classmethod
    def from_dict(cls, d, source: str) -> Scale:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise JudgeTemplateError(f"{source}: 'scale' must be a mapping {{kind, min, max}}")
        unknown = sorted(set(d) - {"kind", "min", "max"})
        if unknown:
            raise JudgeTemplateError(f"{source}: scale: unknown key(s) {unknown}; known ['kind', 'max', 'min']")
        kind = str(d.get("kind", "reference"))
        if kind not in SCALE_KINDS:
            raise JudgeTemplateError(f"{source}: scale.kind: {kind!r} is not one of {list(SCALE_KINDS)}")
        try:
            lo, hi = float(d.get("min", 0.0)), float(d.get("max", 10.0))
        except (TypeError, ValueError):
            raise JudgeTemplateError(f"{source}: scale.min / scale.max must be numbers") from None
        if not lo < hi:
            raise JudgeTemplateError(f"{source}: scale: min {lo:g} must be below max {hi:g}")
        return cls(kind, lo, hi)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "min": self.min, "max": self.max}


class JudgeTemplateError(ValueError):
    """A judge template that is unreadable, misses keys or uses unknown placeholders."""


def placeholders(text: str, allowed: tuple, where: str) -> set:
    """The placeholder names of format string ``text``; raises naming ``where`` and the first bad placeholder."""
    used = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:  # a lone "{" or "}"
        raise JudgeTemplateError(f"{where}: malformed format string ({e}); write literal braces as {{{{ }}}}") from e
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed:
            raise JudgeTemplateError(f"{where}: unknown placeholder {{{name}}}; allowed {list(allowed)}")
        if spec or conversion:
            raise JudgeTemplateError(f"{where}: placeholder {{{name}}} may not have a format spec or conversion")
        used.add(name)
    return used


@dataclass(frozen=True)
class RoleWording:
    """How characters are named in judge text. ``hypothetical_script`` and ``human`` are data values (the
    ``script`` of invented characters, the ``other_role`` of a human partner); the patterns use {name}, {script}."""

    with_script: str = "{name} from {script}"
    hypothetical: str = "{name}, an invented character,"
    hypothetical_script: str = "Hypothetical Characters"
    human: str = "a curious human"
    human_referent: str = "the human"  # how a description refers to the human partner

    @classmethod
    def from_dict(cls, d, source: str) -> RoleWording:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise JudgeTemplateError(f"{source}: 'roles' must be a mapping")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise JudgeTemplateError(f"{source}: roles: unknown key(s) {unknown}; known {sorted(known)}")
        out = cls(**{k: str(v) for k, v in d.items()})
        for key in ("with_script", "hypothetical"):
            used = placeholders(getattr(out, key), NAME_FIELDS, f"{source}: roles.{key}")
            if "name" not in used:
                raise JudgeTemplateError(f"{source}: roles.{key} lacks placeholder {{name}}")
        return out

    def named(self, name: str, script: str) -> str:
        pattern = self.hypothetical if script == self.hypothetical_script else self.with_script
        return pattern.format(name=name, script=script)

    def fields(self, role: str, other_role: str, script: str) -> dict:
        """The role placeholders of one sample (the human partner is never given a script)."""
        human = other_role == self.human
        return {
            "role": role,
            "other_role": other_role,
            "script": script,
            "role_with_script": self.named(role, script),
            "other_role_with_script": other_role if human else self.named(other_role, script),
            "other_role_referent": self.human_referent if human else other_role,
        }


@dataclass(frozen=True)
class JudgeTemplate:
    """The wording of a judge call: system message, prompt, one description per metric, how roles are named."""

    system: str
    prompt: str
    metrics: dict = field(default_factory=dict)
    roles: RoleWording = field(default_factory=RoleWording)
    source: str = "<dict>"
    scale: Scale = field(default_factory=Scale)
    metric_set: str = "mmrole"  # a name in METRIC_SETS, or "custom" (the template's own metric names)

    @classmethod
    def from_dict(cls, d, source: str = "<dict>") -> JudgeTemplate:
        if not isinstance(d, dict):
            raise JudgeTemplateError(f"{source}: expected a mapping at the top level")
        for key in ("system", "prompt", "metrics"):
            if key not in d:
                raise JudgeTemplateError(f"{source}: missing key {key!r}")
        unknown_keys = sorted(set(d) - {"system", "prompt", "metrics", "roles", "scale", "metric_set"})
        if unknown_keys:
            raise JudgeTemplateError(f"{source}: unknown key(s) {unknown_keys}")
        scale = Scale.from_dict(d.get("scale"), source)
        metric_set = str(d.get("metric_set", "mmrole"))
        if metric_set not in METRIC_SETS and metric_set != "custom":
            raise JudgeTemplateError(f"{source}: metric_set: {metric_set!r} is not one of {[*METRIC_SETS, 'custom']}")
        metrics = d["metrics"]
        if not isinstance(metrics, dict):
            raise JudgeTemplateError(f"{source}: 'metrics' must map metric name -> description")
        expected = METRIC_SETS.get(metric_set) or tuple(str(m) for m in metrics)
        missing = [m for m in expected if not str(metrics.get(m) or "").strip()]
        unknown = [m for m in metrics if m not in expected]
        if missing or unknown or not expected:
            raise JudgeTemplateError(
                f"{source}: metrics missing {missing}, unknown {unknown}; expected {list(expected)} "
                f"(metric_set {metric_set})"
            )
        used = placeholders(str(d["prompt"]), PROMPT_FIELDS, f"{source}: prompt")
        # An absolute template shows one reply: it must not have a Model B slot; the others need both.
        required = [f for f in REQUIRED_FIELDS if f != "answer_b" or scale.kind != "absolute"]
        absent = [f for f in required if f not in used]
        if absent:
            raise JudgeTemplateError(f"{source}: prompt lacks placeholder(s) {absent}")
        if scale.kind == "absolute" and "answer_b" in used:
            raise JudgeTemplateError(f"{source}: prompt: an absolute-scale template has no {{answer_b}}")
        placeholders(str(d["system"]), SYSTEM_FIELDS, f"{source}: system")
        for m in expected:
            placeholders(str(metrics[m]), DESCRIPTION_FIELDS, f"{source}: metrics.{m}")
        return cls(
            system=str(d["system"]),
            prompt=str(d["prompt"]),
            # Surrounding whitespace of a YAML folded block is noise; an exact (imported) template has none.
            metrics={m: str(metrics[m]).strip() for m in expected},
            roles=RoleWording.from_dict(d.get("roles"), source),
            source=source,
            scale=scale,
            metric_set=metric_set,
        )

    def to_dict(self) -> dict:
        d = {
            "system": self.system,
            "prompt": self.prompt,
            "metrics": dict(self.metrics),
            "roles": {k: getattr(self.roles, k) for k in RoleWording.__dataclass_fields__},
        }
        # Only a non-default scale / metric set is written: the MMRole templates' dicts (and cache keys) stay as
        # they were.
        if self.scale != Scale():
            d["scale"] = self.scale.to_dict()
        if self.metric_set != "mmrole":
            d["metric_set"] = self.metric_set
        return d

    def _role_fields(self, role: str, other_role: str, script: str) -> dict:
        return self.roles.fields(role or "the character", other_role or "the other party", script)

    def render_system(self, *, role: str = "", other_role: str = "", script: str = "", metric: str = "") -> str:
        """The system message of one (sample, metric)."""
        return self.system.format(metric=metric, **self._role_fields(role, other_role, script))

    def render(
        self,
        *,
        question: str,
        answer_a: str,
        answer_b: str = "",
        metric: str,
        role: str = "",
        other_role: str = "",
        script: str = "",
    ) -> str:
        """The judge prompt for one (sample, metric)."""
        if metric not in self.metrics:
            raise KeyError(f"{self.source}: no description for metric {metric!r}")
        names = self._role_fields(role, other_role, script)
        return self.prompt.format(
            question=question,
            answer_a=answer_a,
            answer_b=answer_b,
            metric=metric,
            metric_description=self.metrics[metric].format(metric=metric, **names),
            **names,
        )


def dump_judge_template(template: JudgeTemplate) -> str:
    """YAML text of ``template`` that loads back to the same template (literal blocks for multi-line text)."""

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper, s):
        style = "|" if "\n" in s and not s.endswith((" ", "\n")) and " \n" not in s else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(template.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 20)
