"""One wording for training and test (prepare re-renders the test questions with the training template), and the
published training JSON / RM_data read as they are."""

from __future__ import annotations

import json
import shutil

import pytest
from sample_data import mmrole_sample_dir, require

from mmrole.data.prepare import PrepareConfig, prepare
from mmrole.data.prepared import iter_samples
from mmrole.data.reader import load_dataset
from mmrole.data.render import expand_dialogue
from mmrole.data.templates import load_roleplay_template


def _paper_template():
    return str(require(mmrole_sample_dir() / "original" / "paper_roleplay.yaml"))


def _published_test(root):
    out = {}
    for f in (root / "data" / "test").glob("*/*_test.json"):
        out.update({r["id"]: r["conversations"][0]["value"] for r in json.loads(f.read_text(encoding="utf-8"))})
    return out


def test_demo_test_questions_follow_the_training_template(demo_root, tmp_path):
    paper = _paper_template()
    m = prepare(demo_root, tmp_path / "same", PrepareConfig(template=paper))
    assert m["wording"]["train"] == m["wording"]["test"] == f"template {load_roleplay_template(paper).source}"
    rr = m["wording"]["test_rerendering"]
    published = _published_test(demo_root)
    test = {s.id: s for s in iter_samples(tmp_path / "same", "test")}
    assert set(test) == set(published)  # ids unchanged, nothing dropped
    assert rr["rerendered"] + rr["kept_published"] == len(published) and rr["rerendered"] > 0
    assert rr["differs_from_published"] > 0  # the demo's test split was written in mmrole's own wording
    # Each re-rendered question is what training renders for that turn with the same template.
    ds, t = load_dataset(demo_root), load_roleplay_template(paper)
    dialogues = {d.id: d for d in ds.iter_dialogues()}
    checked = 0
    for sid, s in test.items():
        d = dialogues.get(sid.rsplit("_", 1)[0])
        ref = next((x for x in expand_dialogue(d, ds.characters, t) if x.id == sid), None) if d else None
        if ref is not None:
            assert (s.system, s.user_text, s.target) == (ref.system, ref.user_text, ref.target)
            checked += 1
    assert checked == rr["rerendered"]
    # The option keeps the published questions as they are.
    m2 = prepare(demo_root, tmp_path / "pub", PrepareConfig(template=paper, test_wording="published"))
    assert m2["wording"]["test"] == "published" and m2["wording"]["test_rerendering"] is None
    assert {s.id: s.user_text for s in iter_samples(tmp_path / "pub", "test")} == published


def test_paper_template_rerenders_the_samples_published_questions_byte_for_byte(tmp_path):
    """The shared sample: its dialogues re-rendered with the paper's template give the published test questions;
    test samples whose dialogues are not in the slice keep the published question, counted."""
    src = mmrole_sample_dir()
    root = tmp_path / "root"
    shutil.copytree(require(src / "profiles"), root / "profiles")
    shutil.copytree(src / "dialogues", root / "dialogues")
    for s, group in (("in-test", "in-distribution"), ("out-test", "out-of-distribution")):
        for f in (src / "eval" / f"{s}_answers" / "mmrole-agent").glob("*_test.json"):
            (root / "data" / "test" / group).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, root / "data" / "test" / group / f.name)
    m = prepare(root, tmp_path / "out", PrepareConfig(template=_paper_template(), require_images=False))
    rr = m["wording"]["test_rerendering"]
    assert rr["rerendered"] > 0 and rr["differs_from_published"] == 0
    assert rr["rerendered"] + rr["kept_published"] == m["counts"]["test"]["in"] == m["counts"]["test"]["out"]
    assert {s.id: s.user_text for s in iter_samples(tmp_path / "out", "test")} == _published_test(root)


def test_published_training_json_and_rm_data_read_as_they_are(demo_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(demo_root, root)
    published = json.loads((root / "data" / "train" / "train.json").read_text(encoding="utf-8"))
    assert published[0]["conversations"][0]["value"].startswith("Picture 1: <img>")
    bad = {
        "id": "broken",
        "conversations": [{"from": "user", "value": "no image tag"}, {"from": "assistant", "value": "x"}],
    }
    (root / "data" / "train" / "extra.json").write_text(json.dumps([bad]), encoding="utf-8")
    m = prepare(root, tmp_path / "out", PrepareConfig(train_source="published"))
    assert m["wording"] == {"train": "published data/train", "test": "published", "test_rerendering": None}
    train = {s.id: s for s in iter_samples(tmp_path / "out", "train")}
    assert len(train) == len(published)  # every published record, as it is
    first = published[0]
    s = train[first["id"]]
    assert f"Picture 1: <img>{s.image}</img>\n{s.user_text}" == first["conversations"][0]["value"]
    assert s.target == first["conversations"][1]["value"]
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert any(r["id"] == "broken" and r["code"] == "no_image" for r in rejects)  # counted, named
    # RM_data as published: one record per (sample, model, metric), read into rm_train / rm_test.
    assert m["counts"]["rm_train"]["out"] > 0 and m["counts"]["rm_train"]["in"] == m["counts"]["rm_train"]["out"]
    with pytest.raises(FileNotFoundError, match="data/train"):
        shutil.rmtree(root / "data" / "train")
        prepare(root, tmp_path / "out2", PrepareConfig(train_source="published"))


def test_prepare_cli_wording_flags(demo_root, tmp_path):
    """`mmrole data prepare --train-source published --test-wording published` reach PrepareConfig."""
    from mmrole.cli import main

    assert main(["data", "prepare", str(demo_root), str(tmp_path / "cli"), "--train-source", "published"]) == 0
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["wording"]["train"] == "published data/train"
    with pytest.raises(SystemExit):
        main(["data", "prepare", str(demo_root), str(tmp_path / "bad"), "--test-wording", "ours"])
