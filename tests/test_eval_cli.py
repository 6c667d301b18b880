"""``mmrole eval report`` over the published sample and over synthetic folders; ``mmrole eval score`` end to end
against a fake OpenAI-compatible server."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

from sample_data import sample_eval_dir as _sample_eval_dir

from mmrole.cli import main
from mmrole.eval.metrics import METRICS

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_OVERALL = {"mmrole-agent": 0.994, "gpt-4-turbo": 1.099, "qwen-vl-chat": 0.843}


def test_report_on_sample_writes_tables_csv_json_plots(tmp_path, capsys):
    eval_dir = _sample_eval_dir()
    out = tmp_path / "rep"
    assert main(["eval", "report", str(eval_dir), "--out", str(out), "--bootstrap", "100"]) == 0
    md = capsys.readouterr().out
    assert "### All test sets" in md and "### in-test" in md and "### out-test" in md
    for model, pub in PUBLISHED_OVERALL.items():
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {model} | 294 |"))
        assert abs(float(line.split("|")[11]) - pub) <= 0.001
    # per-file CSVs identical to the published ones
    published = sorted(eval_dir.glob("*-test_results/*/*_test.csv"))
    assert len(published) == 18
    for p in published:
        assert (out / p.relative_to(eval_dir)).read_bytes() == p.read_bytes()
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["set"]) for r in rows} == {
        (m, s) for m in PUBLISHED_OVERALL for s in ("all", "in-test", "out-test")
    }
    for r in rows:
        if r["set"] == "all":
            assert abs(float(r["Overall"]) - PUBLISHED_OVERALL[r["model"]]) <= 0.001
            assert float(r["Overall_ci_low"]) < float(r["Overall"]) < float(r["Overall_ci_high"])
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"] == list(METRICS) and len(rep["files"]) == 18
    assert sum(s["n_out"] for s in rep["loading"]) == 882 and all(not s["rejected"] for s in rep["loading"])
    for png in ("radar.png", "dimensions.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert (out / "by_character.csv").exists() and (out / "by_dialogue_type.csv").exists()


def test_report_json_on_any_number_of_models(tmp_path, capsys):
    """Two models, one of them only in out-test, with a failed metric and a rejected record."""
    eval_dir = _sample_eval_dir()
    d = tmp_path / "eval"
    src = eval_dir / "out-test_reviews" / "qwen-vl-chat" / "comment_test.json"
    (d / "out-test_reviews" / "a").mkdir(parents=True)
    (d / "out-test_reviews" / "b").mkdir(parents=True)
    shutil.copy(src, d / "out-test_reviews" / "a" / "comment_test.json")
    recs = json.loads(src.read_text())
    recs[0]["rm_review"]["Fluency"] = {"review": "garbage", "score": None, "error": "unparsable after 3 replies"}
    del recs[1]["rm_review"]
    (d / "out-test_reviews" / "b" / "comment_test.json").write_text(json.dumps(recs))
    assert main(["eval", "report", str(d), "--json", "--bootstrap", "0"]) == 0
    cap = capsys.readouterr()
    rep = json.loads(cap.out)
    assert "1 rejected" in cap.err and "missing or malformed 'rm_review'" in cap.err
    a, b = rep["overall"]
    assert (a["model"], a["n_samples"], a["n_failed"]) == ("a", 26, 0)
    assert (b["model"], b["n_samples"], b["n_failed"]) == ("b", 25, 1)
    assert b["metrics"]["Fluency"]["n"] == 24 and b["failures"] == {"unparsable after 3 replies": 1}
    assert [g["set"] for g in rep["by_set"]] == ["out-test", "out-test"]
    assert main(["eval", "report", str(d), "--strict", "--bootstrap", "0"]) == 2
    assert "rm_review" in capsys.readouterr().err


def test_report_errors_are_clear(tmp_path, capsys):
    assert main(["eval", "report", str(tmp_path)]) == 2
    assert "no <set>_reviews" in capsys.readouterr().err
    bad = tmp_path / "in-test_reviews" / "m"
    bad.mkdir(parents=True)
    (bad / "comment_test.json").write_text("[{")
    assert main(["eval", "report", str(tmp_path)]) == 2
    assert "comment_test.json: malformed JSON" in capsys.readouterr().err


def test_score_command_end_to_end_with_resume(tmp_path, capsys, monkeypatch):
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))  # works under any pytest import mode
    from test_eval_openai import OK, FakeOpenAI

    eval_dir = _sample_eval_dir()
    d = tmp_path / "eval"
    dst = d / "out-test_answers" / "agent" / "comment_test.json"
    dst.parent.mkdir(parents=True)
    recs = json.loads((eval_dir / "out-test_answers" / "mmrole-agent" / "comment_test.json").read_text())[:2]
    for _i, r in enumerate(recs):  # tag the question so the fake server can tell the samples apart
        r["conversations"][0]["value"] += f"\nQUESTION-{r['id']}\n"
    dst.write_text(json.dumps(recs))
    images = tmp_path / "images"
    for r in recs:
        (images / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(images / r["image"], format="JPEG")
    monkeypatch.setenv("MY_KEY", "k")
    with FakeOpenAI(OK) as srv:
        args = [
            "eval",
            "score",
            str(d),
            "--model",
            "agent",
            "--judge-model",
            "j",
            "--base-url",
            srv.url,
            "--api-key-env",
            "MY_KEY",
            "--images-root",
            str(images),
            "--metrics",
            "Fluency,Coherency",
        ]
        assert main(args) == 0
        first = json.loads(capsys.readouterr().out)
        assert first["scoring"]["n_scored"] == 4 and first["audit"]["complete"]
        assert main(args) == 0  # resume: nothing left to ask
        second = json.loads(capsys.readouterr().out)
        assert second["scoring"]["n_scored"] == 0 and second["scoring"]["n_already_done"] == 4
        assert main(args + ["--swap"]) == 0
        bias = json.loads(capsys.readouterr().out)["position_bias"]
        assert sum(srv.calls.values()) == 8
        # Several models in one run: the scored one is reused, the new one scored.
        import shutil

        shutil.copytree(d / "out-test_answers" / "agent", d / "out-test_answers" / "agent2")
        multi = [a if a != "agent" else "agent,agent2" for a in args]
        multi[multi.index("--model")] = "--models"
        assert main(multi) == 0
        both = json.loads(capsys.readouterr().out)
        assert both["agent"]["scoring"]["n_scored"] == 0 and both["agent2"]["scoring"]["n_scored"] == 4
        # Another judge model: the cached judgements are not reused.
        other = [a if a != "j" else "j2" for a in args]
        assert main(other) == 0
        assert json.loads(capsys.readouterr().out)["scoring"]["n_scored"] == 4
    assert bias["all"]["n_pairs"] == 4
    assert sum(srv.calls.values()) == 16
    reviews = json.loads((d / "out-test_reviews" / "agent" / "comment_test.json").read_text())
    assert list(reviews[0]["rm_review"]) == ["Fluency", "Coherency"]
    assert reviews[0]["rm_review"]["Fluency"]["score"] == [7.0, 8.0]
    assert (d / "out-test_results" / "agent" / "comment_test.csv").read_text().startswith("count,Fluency,Coherency")
    assert main(["eval", "score", str(d), "--model", "nobody", "--judge-model", "j", "--no-api-key"]) == 2
