"""Reader, renderer, validator, prepare and demo: on the real sample slice and on the demo data."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sample_data import paper_roleplay_template

from mmrole.cli import main as cli_main
from mmrole.data.demo import build_demo
from mmrole.data.images import ImageError, load_image, resolve_image_path
from mmrole.data.prepare import PrepareConfig, prepare
from mmrole.data.prepared import iter_samples, load_manifest, split_files
from mmrole.data.reader import load_dataset, read_test_file
from mmrole.data.records import HUMAN_SPEAKER
from mmrole.data.render import RenderStats, expand_dialogue
from mmrole.data.templates import TemplateError, load_roleplay_template
from mmrole.data.validate import validate

SAMPLE_ROLES = {
    "Albus Dumbledore",
    "Hermione Granger",
    "Iron Man",
    "Chandler Bing",
    "Leonardo da Vinci",
    "Aisha Al-Farsi",
    "Liam Johnson",
    "Buzz Lightyear",
}


# ---- the real slice -------------------------------------------------------------------------------
def test_sample_characters(sample_dir):
    ds = load_dataset(sample_dir)
    assert len(ds.characters) == 72
    kinds = Counter(c.kind for c in ds.characters.values())
    assert kinds["hypothetical"] == 20
    assert kinds["historical-or-public"] == 11  # Renaissance, modern times, Tang dynasty
    chinese = {c.name for c in ds.characters.values() if c.language == "Chinese"}
    assert chinese == {"孙悟空", "唐僧", "猪八戒", "沙悟净", "成龙", "小玉", "老爹", "杜甫", "李白"}
    assert ds.characters["Iron Man"].structured_profile["introduction"].startswith("Iron Man")
    assert ds.characters["Liam Johnson"].structured_profile["origin"] == "Toronto, Canada"
    assert ds.characters["Liam Johnson"].is_hypothetical
    assert not [p for p in ds.problems if p.level == "error"]


def test_sample_dialogue_quirks_and_counts(sample_dir):
    ds = load_dataset(sample_dir)
    dialogues = list(ds.iter_dialogues())
    by_type = Counter(d.type for d in dialogues)
    assert by_type == {"comment": 553, "human-role": 487, "inter-role": 487}
    assert {d.owner for d in dialogues} == SAMPLE_ROLES
    # Both turn-key styles are normalised: comment uses {"from": "human"}, others {"role": "human"}.
    comment = next(d for d in dialogues if d.type == "comment" and len(d.turns) == 2)
    assert comment.turns[0].speaker == HUMAN_SPEAKER and comment.turns[1].speaker == comment.owner
    hr = next(d for d in dialogues if d.type == "human-role" and d.turns)
    assert hr.turns[0].speaker == HUMAN_SPEAKER
    # Inter-role speakers are other dataset characters, all with profiles.
    inter_speakers = {s for d in dialogues if d.type == "inter-role" for s in d.speakers}
    assert len(inter_speakers) > 20 and inter_speakers <= set(ds.characters)
    # Script dialogues carry image info inline; COCO ones have none.
    script = next(d for d in dialogues if "_script_" in d.id)
    assert script.image.has_info
    stats = RenderStats()
    samples = [s for d in dialogues for s in expand_dialogue(d, ds.characters, load_roleplay_template(), stats)]
    assert stats.rejected_by_reason == {"unanswered": 22, "empty_dialogue": 46}
    assert stats.dialogues_in == len(dialogues) == stats.dialogues_out + stats.dialogues_rejected
    per_type = Counter(s.dialogue_type for s in samples)
    # Expansion rule: one per comment, one per role turn, one per utterance.
    assert per_type["comment"] == 553 - 22
    assert per_type["human-role"] == sum(len(d.turns) // 2 for d in dialogues if d.type == "human-role")
    assert per_type["inter-role"] == sum(len(d.turns) for d in dialogues if d.type == "inter-role")
    assert len({s.id for s in samples}) == len(samples)


def test_expansion_rule_ids_and_history(sample_dir):
    ds = load_dataset(sample_dir)
    t = load_roleplay_template()
    d = next(x for x in ds.iter_dialogues() if x.id == "Iron_Man_role-role-dialogue_COCO_47")
    samples = list(expand_dialogue(d, ds.characters, t))
    assert [s.k for s in samples] == list(range(len(d.turns)))
    assert samples[0].id == "Iron_Man_role-role-dialogue_COCO_47_0"
    assert samples[0].history_lines == [] and "Open the conversation" in samples[0].user_text
    s2 = samples[2]
    assert s2.role == "Loki" and s2.other_role == "Iron Man" and s2.target == d.turns[2].text
    assert s2.history_lines == [f"[Loki]: {d.turns[0].text}"]
    assert s2.user_text.endswith(d.turns[1].text)
    assert ds.characters["Loki"].profile in s2.user_text and ds.characters["Iron Man"].profile in s2.user_text
    # Parts reassemble into the full text, and dropping history keeps the instruction.
    assert s2.user_text_with_history() == s2.user_text
    short = s2.user_text_with_history(0)
    assert d.turns[0].text not in short and short.endswith(d.turns[1].text)


def test_paper_template_reproduces_published_test_samples(sample_dir):
    """A swapped template (the paper's wording) renders exactly the published test questions."""
    ds = load_dataset(sample_dir)
    t = load_roleplay_template(paper_roleplay_template())
    rendered = {s.id: s for d in ds.iter_dialogues() for s in expand_dialogue(d, ds.characters, t)}
    compared = 0
    for f in sorted((sample_dir / "eval" / "in-test_answers" / "mmrole-agent").glob("*_test.json")):
        for ts in read_test_file(f, "in-distribution", f.name[: -len("_test.json")]):
            if ts.id not in rendered:
                continue
            s = rendered[ts.id]
            compared += 1
            assert (s.user_text, s.target, s.system, s.role, s.other_role, s.script, s.image) == (
                ts.user_text,
                ts.target,
                ts.system,
                ts.role,
                ts.other_role,
                ts.script,
                ts.image,
            ), ts.id
    assert compared == 21  # every test sample drawn from the 8 roles' dialogues


def test_read_published_test_split(sample_dir):
    n = Counter()
    for s in ("in", "out"):
        for f in (sample_dir / "eval" / f"{s}-test_answers" / "gpt-4-turbo").glob("*_test.json"):
            for x in read_test_file(f, "in-distribution" if s == "in" else "out-of-distribution", f.name[:-10]):
                n[s] += 1
                assert x.k >= 0 and x.user_text and x.target
    assert n == {"in": 216, "out": 78}  # 294 test samples


def test_own_template_differs_and_template_errors(sample_dir, tmp_path):
    ours = load_roleplay_template()
    paper = load_roleplay_template(paper_roleplay_template())
    assert ours.opening != paper.opening and ours.system != paper.system
    bad = tmp_path / "bad.yaml"
    bad.write_text("system: hi\n")
    with pytest.raises(TemplateError, match="missing key"):
        load_roleplay_template(bad)
    text = (paper_roleplay_template()).read_text().replace("{role}:", "{rolee}:")
    bad.write_text(text)
    with pytest.raises(TemplateError, match="rolee"):
        load_roleplay_template(bad)


def test_render_is_deterministic(sample_dir):
    ds1, ds2 = load_dataset(sample_dir), load_dataset(sample_dir)
    t = load_roleplay_template()
    a = [s.to_row() for d in ds1.iter_dialogues() for s in expand_dialogue(d, ds1.characters, t)]
    b = [s.to_row() for d in ds2.iter_dialogues() for s in expand_dialogue(d, ds2.characters, t)]
    assert a == b


# ---- demo data, validate, prepare -----------------------------------------------------------------
def test_demo_layout_and_validate(demo_root):
    rep = validate(demo_root)
    assert rep.ok(), [str(p) for p in rep.errors]
    c = rep.counts
    assert c["characters"] >= 6 and c["characters_by_language"]["Chinese"] == 1
    assert set(c["characters_by_group_kind"]) >= {
        "in-distribution/fictional",
        "in-distribution/hypothetical",
        "in-distribution/historical-or-public",
        "out-of-distribution/fictional",
    }
    assert set(c["dialogues"]) == {
        f"{g}/{t}" for g in ("in-distribution", "out-of-distribution") for t in ("comment", "human-role", "inter-role")
    }
    assert c["test_samples_total"] > 0 and c["images_checked"] == c["images_referenced"]
    # quirks are reported as warnings, with file and id
    assert {p.code for p in rep.warnings} == {"unanswered", "empty_dialogue"}
    assert all(p.file and p.id for p in rep.warnings)
    assert list((demo_root / "RM_data" / "train").glob("*.json"))  # reward-model data in the published layout


def test_validate_reports_bad_input(demo_root, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(demo_root, root)
    f = root / "dialogues" / "in-distribution" / "comment" / "Captain_Nova_COCO.json"
    recs = json.loads(f.read_text())
    recs[0]["image"] = "../../etc/passwd"
    recs[1]["conversations"][1]["role"] = "Nobody Known"
    f.write_text(json.dumps(recs))
    (root / "dialogues" / "in-distribution" / "comment" / "Maya_Chen_COCO.json").write_text("[{oops")
    (root / "images" / "COCO" / "train2017" / "000000000002.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "images" / "COCO" / "train2017" / "000000000003.jpg").unlink()
    rep = validate(root)
    assert not rep.ok()
    errs = {(p.code, Path(p.file).name, p.id) for p in rep.errors}
    codes = {p.code for p in rep.errors}
    assert {"bad_image_path", "unknown_speaker", "bad_json", "bad_image"} <= codes
    assert ("bad_json", "Maya_Chen_COCO.json", "") in errs
    assert any(c == "unknown_speaker" and i == recs[1]["id"] for c, _, i in errs)
    assert any(c == "bad_image_path" and i == recs[0]["id"] for c, _, i in errs)
    # A missing COCO image is a warning (users download COCO), fatal only under --strict.
    assert any(p.code == "missing_coco" for p in rep.warnings)
    assert cli_main(["data", "validate", str(root), "--skip-image-decode"]) == 1


def test_validate_strict_fails_on_missing_coco(demo_root, tmp_path):
    root = tmp_path / "nococo"
    shutil.copytree(demo_root, root)
    (root / "images" / "COCO" / "train2017" / "000000000005.jpg").unlink()
    assert cli_main(["data", "validate", str(root)]) == 0
    assert cli_main(["data", "validate", str(root), "--strict"]) == 1


def test_prepare_round_trip_and_counts(demo_root, demo_prepared):
    m = load_manifest(demo_prepared)
    ds = load_dataset(demo_root)
    t = load_roleplay_template()
    test_ids = {s.id.rsplit("_", 1)[0] for s in ds.iter_test_samples()}
    expected = [s for d in ds.iter_dialogues() if d.id not in test_ids for s in expand_dialogue(d, ds.characters, t)]
    back = list(iter_samples(demo_prepared, "train"))
    assert [s.to_row() for s in back] == [s.to_row() for s in expected]
    assert m["splits"]["train"]["rows"] == len(expected)
    test = list(iter_samples(demo_prepared, "test"))
    assert {s.id for s in test} == {s.id for s in ds.iter_test_samples()}
    # no test dialogue leaks into training
    assert not {s.id.rsplit("_", 1)[0] for s in back} & test_ids
    for split, c in m["counts"].items():
        assert c["in"] == c["out"] + c["rejected"], split
    r = m["render"]
    assert r["dialogues_in"] == r["dialogues_rendered"] + r["dialogues_rejected"] + r["dialogues_held_out_for_test"]
    rejects = [json.loads(line) for line in (demo_prepared / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == sum(r["rejected_by_reason"].values()) and all(x["id"] for x in rejects)
    rm = list(iter_samples(demo_prepared, "rm_train"))
    assert rm and m["counts"]["rm_train"]["rejected"] == 0
    assert all(s.dialogue_type == "judge" and s.system and s.target.rstrip().endswith(")") and s.image for s in rm)
    for rel, digest in m["splits"]["train"]["sha256"].items():
        assert len(digest) == 64 and (demo_prepared / rel).exists()


def test_prepare_is_deterministic_idempotent_and_sharded(demo_root, tmp_path):
    out = tmp_path / "p"
    cfg = PrepareConfig(shard_rows=50, row_group_rows=20, embed_images=True)
    m1 = prepare(demo_root, out, cfg)
    m2 = prepare(demo_root, out, cfg)  # re-run over the same output
    assert m1["splits"] == m2["splits"]
    files = split_files(out, "train")
    assert len(files) == -(-m1["splits"]["train"]["rows"] // 50)
    t = pq.read_table(files[0])
    assert "image_bytes" in t.column_names
    row = t.slice(0, 1).to_pylist()[0]
    img = load_image(m1["images_root"], row["image"], data=row["image_bytes"])
    assert img.size == (128, 96)
    assert not list(tmp_path.glob(".p.tmp-*")) and not list(tmp_path.glob(".p.old-*"))


def test_prepare_rejects_missing_and_escaping_images(demo_root, tmp_path):
    root = tmp_path / "r"
    shutil.copytree(demo_root, root)
    (root / "images" / "COCO" / "train2017" / "000000000004.jpg").unlink()
    f = root / "dialogues" / "in-distribution" / "comment" / "Elena_Varga_COCO.json"
    recs = json.loads(f.read_text())
    recs[0]["image"] = "../outside.png"
    f.write_text(json.dumps(recs))
    m = prepare(root, tmp_path / "out")
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    image_rejects = [r for r in rejects if r["code"] == "image"]
    assert any(r["id"].startswith(recs[0]["id"]) and "escapes" in r["reason"] for r in image_rejects)
    assert any("000000000004.jpg" in r["reason"] for r in image_rejects)
    c = m["counts"]["train"]
    assert c["rejected"] == c["rejected_by_reason"]["image"] == sum(r["split"] == "train" for r in image_rejects)
    assert c["in"] == c["out"] + c["rejected"]


def test_image_loading_guards(demo_root, tmp_path):
    with pytest.raises(ImageError, match="escapes"):
        resolve_image_path(demo_root / "images", "../profiles/x.png")
    with pytest.raises(ImageError, match="absolute"):
        resolve_image_path(demo_root / "images", "/etc/passwd")
    with pytest.raises(ImageError, match="exceeds"):
        load_image(demo_root / "images", "COCO/train2017/000000000001.jpg", max_pixels=100)
    with pytest.raises(ImageError, match="not found"):
        load_image(demo_root / "images", "COCO/nothing.jpg")
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(demo_root / "images", "x.png", data=b"\x89PNG\r\n\x1a\n truncated")


def test_demo_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_demo(a, seed=3)
    build_demo(b, seed=3)
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_cli_prepare_and_published_train_format(demo_root, tmp_path, capsys):
    assert cli_main(["data", "prepare", str(demo_root), str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "train: in" in out and "rejected" in out
    ds = load_dataset(demo_root)
    pub = list(ds.iter_conversation_file(demo_root / "data" / "train" / "train.json", "published"))
    assert pub and all(s.image and not s.user_text.startswith("Picture") for s in pub)
