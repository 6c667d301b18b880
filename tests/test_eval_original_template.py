"""The original MMRole judging script as judge template: byte-exact requests, refusal of other scripts.

The expected requests were computed once, outside the project, by running the original script's own prompt
construction on the sample's published answers; only their sha256 digests are kept here
(``sha256(system + "\\0" + prompt)`` per ``model|set|id|metric``), so no copy of the original wording is.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sample_data import mmrole_sample_dir, require, sample_eval_dir

from mmrole.eval.contract import build_judge_sample, expand_requests
from mmrole.eval.metrics import METRICS
from mmrole.eval.pipeline import load_answers_dir
from mmrole.eval.template import JudgeTemplateError
from mmrole.eval.template_loader import load_judge_template

REPO = Path(__file__).resolve().parents[1]
DIGESTS = Path(__file__).parent / "fixtures" / "original_judge_prompt_digests.json"
MODELS = ("gpt-4-turbo", "mmrole-agent", "qwen-vl-chat")


def _script() -> Path:
    return require(mmrole_sample_dir() / "original" / "RM_review.py")


def _digest(system: str, prompt: str) -> str:
    return hashlib.sha256((system + "\x00" + prompt).encode("utf-8")).hexdigest()


def test_original_script_gives_byte_exact_requests_for_every_answered_pair():
    expected = json.loads(DIGESTS.read_text(encoding="utf-8"))
    template = load_judge_template(_script())
    mine = {}
    for model in MODELS:
        answers, _ = load_answers_dir(sample_eval_dir(), model)
        for req in expand_requests([a for a in answers if a.answer]):
            s = build_judge_sample(req, template)
            mine[f"{model}|{req.set_name}|{req.sample_id}|{req.metric}"] = _digest(s.system, s.user_text)
    assert len(mine) == len(expected) == 294 * 8 * 3
    wrong = sorted(k for k in expected if mine.get(k) != expected[k])
    assert not wrong, f"{len(wrong)} requests differ from the original's, e.g. {wrong[:3]}"
    # The packaged template is a different wording: the comparison can fail.
    ours = load_judge_template()
    answers, _ = load_answers_dir(sample_eval_dir(), MODELS[0])
    req = expand_requests(answers[:1])[0]
    s = build_judge_sample(req, ours)
    assert expected[f"{MODELS[0]}|{req.set_name}|{req.sample_id}|{req.metric}"] != _digest(s.system, s.user_text)


def test_import_template_cli_writes_an_equivalent_yaml(tmp_path):
    out = tmp_path / "original_judge.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "mmrole.cli", "eval", "import-template", str(_script()), "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    from_yaml, from_script = load_judge_template(out), load_judge_template(_script())
    assert from_yaml.to_dict() == from_script.to_dict()
    d = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert set(d["metrics"]) == set(METRICS)
    assert "{role_with_script}" in d["prompt"] and "{metric_description}" in d["prompt"]
    # Hypothetical characters and the curious human are named as the original names them.
    names = from_script.roles.fields("Liam Johnson", "a curious human", "Hypothetical Characters")
    assert names["other_role_with_script"] == "a curious human"
    assert names["role_with_script"].startswith("Liam Johnson, ") and names["other_role_referent"] != "a curious human"
    assert from_script.roles.fields("Iron Man", "Pepper Potts", "Iron Man")["other_role_with_script"].startswith(
        "Pepper Potts "
    )


def test_project_carries_no_copy_of_the_original_wording():
    template = load_judge_template(_script())
    phrases = [template.system, *(d.split(":", 1)[1].strip()[:60] for d in template.metrics.values())]
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    for rel in tracked.split():
        p = REPO / rel
        if not p.is_file() or p.suffix not in (".py", ".yaml", ".yml", ".md", ".json", ".txt", ".toml"):
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        for phrase in phrases:
            assert phrase not in text, f"{rel} holds original judge wording: {phrase[:40]!r}"


def test_a_script_that_is_not_the_original_is_refused_saying_what_is_missing(tmp_path):
    original = _script().read_text(encoding="utf-8")
    bogus = tmp_path / "other.py"
    bogus.write_text("import json\n\ndef main():\n    print(json.dumps({}))\n")
    with pytest.raises(JudgeTemplateError, match="not the original MMRole judging script.*missing: .*metric"):
        load_judge_template(bogus)
    # The original without its metric loop (a plausible edit): refused, naming the loop.
    edited = tmp_path / "edited.py"
    edited.write_text(original.replace("for score_key in aspect_desc:", "for score_key in sorted(aspect_desc):"))
    with pytest.raises(JudgeTemplateError, match="loop over the metrics"):
        load_judge_template(edited)
    broken = tmp_path / "broken.py"
    broken.write_text("import os\ndef f(:\n")
    with pytest.raises(JudgeTemplateError, match="not valid Python"):
        load_judge_template(broken)


@pytest.mark.parametrize(
    "where, value, message",
    [
        ("prompt", "{question}{answer_a}{answer_b}{metric_description}{nope}", r"prompt: unknown placeholder \{nope\}"),
        ("prompt", "{question}{answer_a}{metric_description}", r"lacks placeholder\(s\) \['answer_b'\]"),
        ("system", "judge {answer_a}", r"system: unknown placeholder \{answer_a\}"),
        ("Fluency", "fluent as {role} in {place}?", r"metrics.Fluency: unknown placeholder \{place\}"),
        ("roles", {"with_script": "{script} person"}, r"roles.with_script lacks placeholder \{name\}"),
        ("roles", {"colour": "x"}, r"roles: unknown key"),
        ("prompt", "{question}{answer_a}{answer_b}{metric_description} {", "malformed format string"),
    ],
)
def test_template_placeholder_errors_name_the_placeholder(tmp_path, where, value, message):
    d = load_judge_template().to_dict()
    if where in METRICS:
        d["metrics"][where] = value
    else:
        d[where] = value
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(d), encoding="utf-8")
    with pytest.raises(JudgeTemplateError, match=message):
        load_judge_template(p)


def test_descriptions_and_system_use_role_placeholders():
    d = load_judge_template().to_dict()
    d["system"] = "You judge {role_with_script}."
    d["metrics"]["Fluency"] = "Does {role} answer {other_role_referent} fluently?"
    from mmrole.eval.template import JudgeTemplate

    t = JudgeTemplate.from_dict(d)
    kw = dict(role="Liam", other_role="a curious human", script="Hypothetical Characters")
    assert t.render_system(**kw) == "You judge Liam, an invented character,."
    p = t.render(question="q {x}", answer_a="a", answer_b="b", metric="Fluency", **kw)
    assert "Does Liam answer the human fluently?" in p and "q {x}" in p


def test_prompts_dry_run_writes_the_original_requests_with_token_estimates(tmp_path, capsys):
    from mmrole.cli import main

    out = tmp_path / "requests.jsonl"
    rc = main(
        ["eval", "prompts", str(sample_eval_dir()), "--models", "qwen-vl-chat", "--judge-template", str(_script())]
        + ["--out", str(out)]
    )
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 294 * 8
    assert set(lines[0]) == {"model", "set", "type", "id", "metric", "system", "prompt", "image"}
    assert {x["set"] for x in lines} == {"in-test", "out-test"}
    assert {x["type"] for x in lines} == {"comment", "human-role", "inter-role"}
    expected = json.loads(DIGESTS.read_text(encoding="utf-8"))
    for x in lines:
        assert expected[f"{x['model']}|{x['set']}|{x['id']}|{x['metric']}"] == _digest(x["system"], x["prompt"])
    summary = capsys.readouterr().err
    row = next(ln for ln in summary.splitlines() if ln.startswith("| qwen-vl-chat"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["294", "0", "2352"]
    chars = sum(len(x["system"]) + len(x["prompt"]) for x in lines)
    assert chars / 5 < int(cells[4]) < chars / 3  # about 4 characters per token
    # An unknown model is an error naming it, not an empty file.
    assert main(["eval", "prompts", str(sample_eval_dir()), "--models", "nope", "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
