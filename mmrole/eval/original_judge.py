"""Read the original MMRole judging script (``eval/RM_review.py``) as data and convert it into a judge template.

The script is parsed with :mod:`ast`, never imported or executed. What it builds per (sample, metric) — the
system message, the prompt f-string, the per-metric descriptions and how a role is named with its script — is
turned into our template's format strings, so the project carries no copy of the original wording: the user
points ``--judge-template`` at their own copy of the script.

What is recognised (by structure, not by file name):
- the record fields bound to variables: ``data["role"]``, ``data["script"]``, ``data["other_role"]``,
  ``data["conversations"][0]["value"]`` (question), ``[1]["answer"]`` (evaluated), ``[1]["value"]`` (ground truth);
- the branch on ``script == <hypothetical script>`` assigning the role-with-script strings, with the inner branch
  on ``other_role == <human>``; the conditional expression naming the human partner in descriptions;
- the metric descriptions dict (the 8 metrics), the prompt f-string that uses ``<dict>[<metric>]``, every
  f-string variable it uses (inlined), and the system message passed with the prompt to the model call.
"""

from __future__ import annotations

import ast
from typing import Optional

from .metrics import METRICS
from .template import JudgeTemplateError

# ast.unparse of the record accessors -> our placeholder
_RECORD_FIELDS = {
    "data['role']": "role",
    "data['script']": "script",
    "data['other_role']": "other_role",
    "data['conversations'][0]['value']": "question",
    "data['conversations'][1]['answer']": "answer_a",
    "data['conversations'][1]['value']": "answer_b",
}
WHAT = "the original MMRole judging script (eval/RM_review.py)"


def looks_like_python(text: str) -> bool:
    """A cheap content check: Python source with the judging script's metric dict, not a YAML template."""
    head = text.lstrip()[:4000]
    return (head.startswith(("import ", "from ", "#!", '"""')) or "\nimport " in head) and "def " in text


class _Converter:
    def __init__(self, tree: ast.Module, source: str):
        self.source = source
        self.assigns: dict[str, list[ast.expr]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.assigns.setdefault(node.targets[0].id, []).append(node.value)
        self.tree = tree
        self.missing: list[str] = []
        self.var: dict[str, str] = {}  # variable -> placeholder
        for name, values in self.assigns.items():
            for v in values:
                key = ast.unparse(v)
                if key in _RECORD_FIELDS:
                    self.var[name] = _RECORD_FIELDS[key]
        self.field_var = {p: n for n, p in self.var.items()}
        for p in _RECORD_FIELDS.values():
            if p not in self.field_var:
                self.missing.append(f"the record field binding for {p} ({_key_of(p)})")

    # -- expressions -> format strings
    def fmt(self, node: ast.expr, names: dict[str, str], inline: dict[str, ast.expr], where: str) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value.replace("{", "{{").replace("}", "}}")
        if isinstance(node, ast.JoinedStr):
            return "".join(self.fmt(v, names, inline, where) for v in node.values)
        if isinstance(node, ast.FormattedValue):
            if node.conversion != -1 or node.format_spec is not None:
                raise self.refuse(f"{where}: formatted value with conversion/format spec: {ast.unparse(node)}")
            return self.fmt(node.value, names, inline, where)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.fmt(node.left, names, inline, where) + self.fmt(node.right, names, inline, where)
        if isinstance(node, ast.Name):
            if node.id in names:
                return "{" + names[node.id] + "}"
            if node.id in inline:
                return self.fmt(inline[node.id], names, inline, where)
        if isinstance(node, ast.Subscript) and "[]" in names:
            if ast.unparse(node) == names["[]"]:
                return "{metric_description}"
        raise self.refuse(f"{where}: cannot express {ast.unparse(node)!r} as a template placeholder")

    def refuse(self, why: str) -> JudgeTemplateError:
        return JudgeTemplateError(f"{self.source}: not usable as {WHAT}: {why}")

    # -- pieces
    def metric_dict(self) -> Optional[tuple[str, ast.Dict]]:
        for name, values in self.assigns.items():
            for v in values:
                if isinstance(v, ast.Dict) and all(isinstance(k, ast.Constant) for k in v.keys):
                    keys = [k.value for k in v.keys]
                    if sorted(keys) == sorted(METRICS):
                        return name, v
        self.missing.append(f"the metric descriptions dict (keys: the 8 metrics {list(METRICS)})")
        return None

    def role_wording(self) -> Optional[dict]:
        """From ``if script == X: role_script = ...; if other_role == H: ... else: ...`` and the referent IfExp."""
        script_v, role_v, other_v = (self.field_var.get(p) for p in ("script", "role", "other_role"))
        for node in ast.walk(self.tree):
            if not (isinstance(node, ast.If) and _compare(node.test, script_v, ast.Eq)):
                continue
            hypo = _compare(node.test, script_v, ast.Eq)
            out = {"hypothetical_script": hypo}
            patterns = {}
            for branch, key in ((node.body, "hypothetical"), (node.orelse, "with_script")):
                found = self._branch_patterns(branch, role_v, other_v, script_v, key)
                if found is None:
                    return None
                pattern, human = found
                patterns[key] = pattern
                out["human"] = human
            out.update(patterns)
            referent = self._human_referent(other_v, out["human"])
            if referent is None:
                return None
            out["human_referent"] = referent
            return out
        self.missing.append(f"the branch on `{script_v or 'script'} == <hypothetical script>` naming the roles")
        return None

    def _branch_patterns(self, body, role_v, other_v, script_v, key) -> Optional[tuple[str, str]]:
        role_pattern = other_pattern = human = None
        for stmt in body:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
                role_pattern = self.fmt(stmt.value, {role_v: "name", script_v: "script"}, {}, f"roles.{key}")
                role_target = stmt.targets[0].id
            elif isinstance(stmt, ast.If) and _compare(stmt.test, other_v, ast.Eq):
                human = _compare(stmt.test, other_v, ast.Eq)
                plain = [s for s in stmt.body if isinstance(s, ast.Assign)]
                if not (plain and isinstance(plain[0].value, ast.Name) and plain[0].value.id == other_v):
                    raise self.refuse(f"roles.{key}: the human partner is not named as is")
                other_target = plain[0].targets[0].id
                named = [s for s in stmt.orelse if isinstance(s, ast.Assign)]
                if not named:
                    raise self.refuse(f"roles.{key}: no naming of the other role")
                other_pattern = self.fmt(named[0].value, {other_v: "name", script_v: "script"}, {}, f"roles.{key}")
        if role_pattern is None or other_pattern is None or human is None:
            self.missing.append(f"the role / other role naming in the {key} branch")
            return None
        if role_pattern != other_pattern:
            raise self.refuse(
                f"roles.{key}: the role ({role_pattern!r}) and the other role ({other_pattern!r}) are named differently"
            )
        self.var[role_target] = "role_with_script"
        self.var[other_target] = "other_role_with_script"
        return role_pattern, human

    def _human_referent(self, other_v, human) -> Optional[str]:
        for name, values in self.assigns.items():
            for v in values:
                if (
                    isinstance(v, ast.IfExp)
                    and _compare(v.test, other_v, ast.NotEq) == human
                    and isinstance(v.body, ast.Name)
                    and v.body.id == other_v
                    and isinstance(v.orelse, ast.Constant)
                    and isinstance(v.orelse.value, str)
                ):
                    self.var[name] = "other_role_referent"
                    return v.orelse.value
        self.missing.append("the expression naming the human partner in descriptions (`x if other_role != H else R`)")
        return None

    def prompt_and_system(self, dict_name: str, metric_var: str) -> Optional[tuple[str, ast.expr, ast.expr]]:
        subscript = f"{dict_name}[{metric_var}]"
        for name, values in self.assigns.items():
            for v in values:
                if isinstance(v, ast.JoinedStr) and any(
                    isinstance(x, ast.FormattedValue) and ast.unparse(x.value) == subscript for x in v.values
                ):
                    system = self._system_for(name)
                    return name, v, system
        self.missing.append(f"the judge prompt f-string using {subscript}")
        return None

    def _system_for(self, prompt_var: str) -> Optional[ast.expr]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call):
                args = [a.id if isinstance(a, ast.Name) else None for a in node.args]
                if prompt_var in args:
                    for a in args:
                        if a and a != prompt_var and a in self.assigns:
                            v = self.assigns[a][-1]
                            if isinstance(v, (ast.Constant, ast.JoinedStr)) and a not in self.var:
                                return v
        self.missing.append(f"the system message passed with {prompt_var!r} to the model call")
        return None

    def metric_loop_var(self, dict_name: str) -> Optional[str]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.For) and isinstance(node.iter, ast.Name) and node.iter.id == dict_name:
                if isinstance(node.target, ast.Name):
                    return node.target.id
        self.missing.append(f"the loop over the metrics of {dict_name!r}")
        return None


def _key_of(placeholder: str) -> str:
    return next(k for k, v in _RECORD_FIELDS.items() if v == placeholder)


def _compare(test, var: Optional[str], op) -> Optional[str]:
    """The string constant of ``var <op> "const"``, else None."""
    if (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == var
        and len(test.ops) == 1
        and isinstance(test.ops[0], op)
        and isinstance(test.comparators[0], ast.Constant)
        and isinstance(test.comparators[0].value, str)
    ):
        return test.comparators[0].value
    return None


def convert_original_script(text: str, source: str = "<script>") -> dict:
    """The judge template (a dict for :meth:`JudgeTemplate.from_dict`) that the original script's construction
    amounts to; raises :class:`JudgeTemplateError` saying what is missing when ``text`` is not that script."""
    try:
        tree = ast.parse(text, filename=source)
    except SyntaxError as e:
        raise JudgeTemplateError(f"{source}: not {WHAT}: not valid Python ({e.msg}, line {e.lineno})") from e
    c = _Converter(tree, source)
    found = c.metric_dict()
    roles = c.role_wording() if not c.missing else None
    parts = None
    if found and roles:
        dict_name, metric_dict = found
        loop_var = c.metric_loop_var(dict_name)
        if loop_var:
            parts = c.prompt_and_system(dict_name, loop_var)
    if c.missing or parts is None or roles is None or found is None:
        raise JudgeTemplateError(f"{source}: not {WHAT}; missing: " + "; ".join(dict.fromkeys(c.missing)))
    dict_name, metric_dict = found
    prompt_var, prompt_node, system_node = parts
    names = dict(c.var)
    names[loop_var] = "metric"
    names["[]"] = f"{dict_name}[{loop_var}]"
    # Variables the prompt uses that are themselves f-strings (e.g. the task sentence) are inlined.
    inline = {
        n: vs[-1]
        for n, vs in c.assigns.items()
        if n not in names and n != prompt_var and isinstance(vs[-1], (ast.JoinedStr, ast.Constant, ast.BinOp))
    }
    desc_names = {k: v for k, v in names.items() if v not in ("question", "answer_a", "answer_b")}
    metrics = {
        k.value: c.fmt(v, desc_names, {}, f"metrics.{k.value}") for k, v in zip(metric_dict.keys, metric_dict.values)
    }
    return {
        "system": c.fmt(system_node, desc_names, {}, "system"),
        "prompt": c.fmt(prompt_node, names, inline, "prompt"),
        "metrics": metrics,
        "roles": roles,
    }
