"""Reading a judge template: a template YAML, the original MMRole judging script (``eval/RM_review.py``, converted at
load by :mod:`mmrole.eval.original_judge` so requests can equal the original's byte for byte), or the packaged one."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import yaml

from .original_judge import convert_original_script, looks_like_python
from .template import JUDGE_TEMPLATE_ENV, PACKAGED_TEMPLATE, JudgeTemplate, JudgeTemplateError


def _read_template(p: Path) -> JudgeTemplate:
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise JudgeTemplateError(f"{p}: cannot read judge template ({e})") from e
    if p.suffix == ".py" or looks_like_python(text):
        return JudgeTemplate.from_dict(convert_original_script(text, str(p)), str(p))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JudgeTemplateError(f"{p}: cannot read judge template ({e})") from e
    return JudgeTemplate.from_dict(data, str(p))


def load_judge_template(path: Optional[Union[str, Path]] = None) -> JudgeTemplate:
    """Load ``path`` (a template YAML, or the original MMRole ``RM_review.py``), else $MMROLE_JUDGE_TEMPLATE, else
    the packaged ``mmrole/templates/judge.yaml``."""
    path = path or os.environ.get(JUDGE_TEMPLATE_ENV)
    if path:
        return _read_template(Path(path))
    text = resources.files("mmrole.templates").joinpath(PACKAGED_TEMPLATE).read_text(encoding="utf-8")
    return JudgeTemplate.from_dict(yaml.safe_load(text), f"mmrole/templates/{PACKAGED_TEMPLATE}")
