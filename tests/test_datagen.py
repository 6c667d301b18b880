"""``mmrole data generate`` against a canned local teacher: happy path through validate and prepare, every reject
path counted, the cache on rerun, the characters-file schema, gates and the tolerant parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from canned_teacher import CannedTeacher, generate, make_images, rejects, write_characters

from mmrole.cli import main as mmrole_main
from mmrole.config import ConfigError
from mmrole.datagen.config import GateConfig, load_characters
from mmrole.datagen.dedup import NearDuplicateIndex
from mmrole.datagen.gates import GateError, check_dialogue
from mmrole.datagen.parse import ReplyError, parse_json_reply

CHARACTERS = [
    {
        "name": "Ada Fenwick",
        "source": "the Victorian era",
        "raw_text": "Ada Fenwick was a Victorian engineer who built clockwork bridges over the Thames.",
    },
    {"name": "Nora Quist", "source": "hypothetical", "brief": "a lighthouse keeper in her thirties"},
    {"name": "李青", "source": "江湖传说", "language": "Chinese", "group": "out-of-distribution"},
]


@pytest.fixture(scope="module")
def teacher():
    """One canned teacher for the module (the cache key includes the teacher's URL), 429 once per annotation."""
    with CannedTeacher(fail_first_429=True, delay_s=0.02) as t:
        yield t


@pytest.fixture(scope="module")
def generated(tmp_path_factory, teacher):
    """3 new characters (famous, hypothetical, Chinese) x 6 images (+1 corrupt)."""
    tmp = tmp_path_factory.mktemp("datagen")
    make_images(tmp / "pics")
    rc, root = generate(tmp, CHARACTERS, teacher.url)
    return {
        "rc": rc,
        "root": root,
        "hits": teacher.hits,
        "max_inflight": teacher.max_inflight,
        "bodies": list(teacher.bodies),
        "tmp": tmp,
    }


def test_generate_writes_the_published_layout_that_validate_accepts(generated, capsys):
    root = generated["root"]
    assert generated["rc"] == 0
    summary = json.loads((root / "generate_summary.json").read_text())
    st = summary["stages"]
    assert st["images"] == {"in": 7, "out": 6, "rejected": 1, "rejected_by_reason": {"bad_image": 1}}
    assert st["meta_info"]["out"] == 1 and st["profile"]["out"] == 3
    assert st["annotation"]["out"] == 6
    # 3 characters x 6 images x 3 types, all accepted (the canned dialogues differ per image)
    assert st["dialogues"] == {"in": 54, "out": 54, "rejected": 0, "rejected_by_reason": {}}
    assert st["near_duplicates"]["out"] == 54
    assert st["test_split"]["out"] == 9  # one per (character, type)
    for stage in st.values():
        assert stage["in"] == stage["out"] + stage["rejected"]
    # the 429s were retried: one more HTTP attempt than requests per annotation
    t = summary["teacher"]
    assert t["http_attempts"] == t["requests"] + 6 == generated["hits"]
    assert t["prompt_tokens"] > 0 and t["cost_usd"] > 0
    assert generated["max_inflight"] <= 4  # teacher.max_concurrency
    (bad,) = rejects(root)
    assert bad["stage"] == "images" and bad["image"] == "broken.jpg" and bad["code"] == "bad_image"
    # the published layout
    assert json.loads((root / "profiles/in-distribution/roles.json").read_text()) == {
        "the Victorian era": ["Ada Fenwick"],
        "Hypothetical Characters": ["Nora Quist"],
    }
    assert (root / "profiles/in-distribution/meta_info_hypo/Nora_Quist.json").exists()
    assert (root / "profiles/in-distribution/detailed_profiles/Ada_Fenwick.json").exists()
    assert "李青" in json.loads((root / "profiles/out-of-distribution/profiles.json").read_text())
    assert len(json.loads((root / "dialogues/in-distribution/inter-role/Nora_Quist_script.json").read_text())) == 6
    ood = json.loads((root / "dialogues/out-of-distribution/comment.json").read_text())
    assert [d["id"] for d in ood][:2] == ["李青_comment_script_0", "李青_comment_script_1"]
    assert len(json.loads((root / "images/annotations.json").read_text())) == 6
    assert (root / "data/test/out-of-distribution/inter-role_test.json").exists()
    # structured output was asked for
    assert all(b["response_format"]["type"] == "json_schema" for b in generated["bodies"])
    capsys.readouterr()
    assert mmrole_main(["data", "validate", str(root), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["errors"] == 0
    assert rep["counts"]["characters"] == 3 and rep["counts"]["characters_by_language"] == {"English": 2, "Chinese": 1}
    assert rep["counts"]["test_samples_total"] == 9
    assert rep["counts"]["dialogues_total"] == 54


def test_generated_data_prepares(generated):
    from mmrole.data.prepare import prepare

    m = prepare(generated["root"], generated["tmp"] / "prepared")
    assert m["counts"]["test"]["out"] == 9 and m["counts"]["test"]["rejected"] == 0
    assert m["render"]["dialogues_held_out_for_test"] == 9
    assert m["counts"]["train"]["out"] > 45 and m["counts"]["train"]["rejected"] == 0
    assert m["problems"]["errors"] == 0


def test_rerun_uses_the_cache_and_redoes_only_what_changed(generated, teacher):
    tmp = generated["tmp"]
    chars = [dict(c) for c in CHARACTERS]
    chars[0]["raw_text"] += " She also kept bees."  # Ada's profile input changed
    before = teacher.hits
    rc, root = generate(tmp, chars, teacher.url, out="gen")
    assert rc == 0
    s = json.loads((root / "generate_summary.json").read_text())
    # Ada's profile, her 18 dialogues, and the 6 inter-role dialogues of 李青, whose partner she is
    assert s["teacher"]["requests"] == teacher.hits - before == 1 + 18 + 6
    assert s["teacher"]["cache_hits"] == 1 + 2 + 6 + 54 - 24
    assert s["stages"]["dialogues"]["out"] == 54 and s["stages"]["test_split"]["out"] == 9


def test_reject_paths_are_reported_with_character_image_and_stage(tmp_path):
    make_images(tmp_path / "pics", n=3, corrupt=False)
    (tmp_path / "pics" / "notes.txt").write_text("not a picture")
    chars = [
        {"name": "Good Gwen", "source": "hypothetical"},
        {"name": "Malformed Mary", "source": "Broken Tales"},
        {"name": "Refuse Rita", "source": "Broken Tales"},
        {"name": "Slow Sam", "source": "Broken Tales"},
        {"name": "Disclaimer Dan", "source": "Broken Tales", "partner": "Confused Carl"},
        {"name": "Confused Carl", "source": "Broken Tales", "partner": "Good Gwen"},
        {"name": "王Wrongtongue", "source": "江湖", "language": "Chinese", "partner": "Good Gwen"},
        {"name": "Echo Emma", "source": "hypothetical", "partner": "Good Gwen"},
        {"name": "Dull Dora", "source": "Broken Tales", "partner": "Good Gwen"},
    ]
    with CannedTeacher(no_schema=True, slow_s=2.0) as t:
        rc, root = generate(
            tmp_path, chars, t.url, "teacher.timeout_s=0.5", "teacher.max_http_retries=1", "judge.enabled=true"
        )
        # auto structured output: the 400 made the client drop response_format and carry on
        assert any("response_format" not in b for b in t.bodies)
    assert rc == 0  # every stage still produced something usable
    rej = rejects(root)
    by = {(r["stage"], r["character"], r["code"]) for r in rej}
    assert ("profile", "Malformed Mary", "malformed_json") in by
    assert ("profile", "Refuse Rita", "refusal") in by
    assert ("profile", "Slow Sam", "timeout") in by
    assert ("dialogues", "Disclaimer Dan", "disclaimer") in by
    assert ("dialogues", "Confused Carl", "speaker_confusion") in by
    assert ("dialogues", "王Wrongtongue", "language") in by
    assert ("near_duplicates", "Echo Emma", "near_duplicate") in by
    assert ("judge", "Dull Dora", "low_score") in by
    assert ("images", "", "not_an_image") in by
    # characters without a profile: their dialogues are rejected, not dropped, naming character, image and type
    no_profile = [r for r in rej if r["code"] == "no_profile"]
    assert {r["character"] for r in no_profile} == {"Malformed Mary", "Refuse Rita", "Slow Sam"}
    assert all(r["image"] and r["type"] for r in no_profile)
    s = json.loads((root / "generate_summary.json").read_text())
    for name, c in s["stages"].items():
        assert c["in"] == c["out"] + c["rejected"], name
        assert c["rejected"] == sum(1 for r in rej if r["stage"] == name), name
    assert (root / "data/test").is_dir()


def test_401_is_reported_and_the_run_fails(tmp_path, monkeypatch, capsys):
    make_images(tmp_path / "pics", n=2, corrupt=False)
    monkeypatch.setenv("CANNED_KEY", "wrong")
    with CannedTeacher(api_key="right") as t:
        rc, root = generate(
            tmp_path, CHARACTERS[:2], t.url, "teacher.api_key_env=CANNED_KEY", "teacher.require_api_key=true"
        )
        hits = t.hits
    assert rc == 1
    assert hits == 1  # no retry can fix a bad key: the first 401 stops the other requests
    s = json.loads((root / "generate_summary.json").read_text())
    assert "profile" in s["stages_with_nothing_usable"] and not s["ok"]
    rej = rejects(root)
    assert {r["code"] for r in rej if r["stage"] in ("meta_info", "profile", "annotation")} == {"auth", "no_meta_info"}
    assert any(r["stage"] == "meta_info" and r["character"] == "Nora Quist" and "401" in r["reason"] for r in rej)
    assert "nothing usable" in capsys.readouterr().err


def test_missing_api_key_and_estimate_only(tmp_path, monkeypatch, capsys):
    make_images(tmp_path / "pics", n=2, corrupt=False)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    chars = write_characters(tmp_path / "c.yaml", CHARACTERS)
    base = ["data", "generate", "--characters", str(chars), "--images", str(tmp_path / "pics"), "--out"]
    assert mmrole_main([*base, str(tmp_path / "o"), "teacher.api_key_env=NO_SUCH_KEY_VAR"]) == 1
    assert "NO_SUCH_KEY_VAR" in capsys.readouterr().err
    assert mmrole_main([*base, str(tmp_path / "o"), "--estimate-only", "teacher.api_key_env=NO_SUCH_KEY_VAR"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["calls"] == {
        "meta_info": 1,
        "profile": 3,
        "annotation": 2,
        "comment": 6,
        "human-role": 6,
        "inter-role": 6,
    }
    assert est["usd"] > 0


def test_characters_file_errors_name_the_character_and_key(tmp_path, capsys):
    bad = write_characters(tmp_path / "a.yaml", [{"name": "Ada"}, {"name": "Bob", "favourite_colour": "red"}])
    with pytest.raises(ConfigError, match=r"characters\[1\] \(Bob\)\.favourite_colour"):
        load_characters(bad)
    nameless = write_characters(tmp_path / "b.yaml", [{"name": "Ada"}, {"source": "X"}])
    with pytest.raises(ConfigError, match=r"characters\[1\] \(no name\)\.name"):
        load_characters(nameless)
    lang = write_characters(tmp_path / "c.yaml", [{"name": "Ada", "language": "Klingon"}])
    with pytest.raises(ConfigError, match=r"characters\[0\] \(Ada\).*language"):
        load_characters(lang)
    partner = write_characters(tmp_path / "d.yaml", [{"name": "Ada", "partner": "Zed"}])
    with pytest.raises(ConfigError, match=r"\(Ada\)\.partner"):
        load_characters(partner)
    (tmp_path / "pics").mkdir()
    rc = mmrole_main(["data", "generate", "--characters", str(bad), "--images", str(tmp_path / "pics"), "--out", "x"])
    assert rc == 2 and "favourite_colour" in capsys.readouterr().err


def test_tolerant_parser():
    assert parse_json_reply('```json\n{"a": 1,}\n```') == {"a": 1}
    assert parse_json_reply('Sure: {"a": "b {c}"} bye') == {"a": "b {c}"}
    with pytest.raises(ReplyError) as e:
        parse_json_reply("I'm sorry, but I can't write that.")
    assert e.value.code == "refusal"
    with pytest.raises(ReplyError) as e:
        parse_json_reply("{not json")
    assert e.value.code == "malformed_json"


def test_dialogue_gates():
    g = GateConfig()
    ok = {
        "turns": [{"speaker": "Human", "text": "What do you see here?"}, {"speaker": "ada", "text": "A bridge, dear."}]
    }
    assert check_dialogue(ok, "comment", "Ada", None, "English", g) == [
        ("human", "What do you see here?"),
        ("Ada", "A bridge, dear."),
    ]
    swapped = {"turns": ok["turns"][::-1]}
    with pytest.raises(GateError) as e:
        check_dialogue(swapped, "comment", "Ada", None, "English", g)
    assert e.value.code == "turn_order"
    twice = {
        "turns": [{"speaker": "Ada", "text": "Look at that!"}] * 2 + [{"speaker": "Bob", "text": "Indeed so."}] * 2
    }
    with pytest.raises(GateError) as e:
        check_dialogue(twice, "inter-role", "Ada", "Bob", "English", g)
    assert e.value.code == "speaker_confusion"
    short = {"turns": [{"speaker": "human", "text": "Hm?"}, {"speaker": "Ada", "text": "Yes, a bridge."}]}
    with pytest.raises(GateError) as e:
        check_dialogue(short, "comment", "Ada", None, "English", g)
    assert e.value.code == "length"
    zh = {
        "turns": [
            {"speaker": "human", "text": "你看到了什么呢？"},
            {"speaker": "李", "text": "我作为一个AI无法回答这个问题。"},
        ]
    }
    with pytest.raises(GateError) as e:
        check_dialogue(zh, "comment", "李", None, "Chinese", g)
    assert e.value.code == "disclaimer"


def test_near_duplicate_index():
    idx = NearDuplicateIndex(0.8)
    assert idx.check_and_add("a", "1", "The bridge over the river is made of iron and glass.") is None
    dup = idx.check_and_add("a", "2", "The bridge over the river is made of iron and glass!")
    assert dup is not None and dup[0] == "1"
    assert idx.check_and_add("a", "3", "A completely different sentence about bees and honey.") is None
    assert idx.check_and_add("b", "4", "The bridge over the river is made of iron and glass.") is None


def test_cluster_job_entry_point_parses_the_same_arguments(tmp_path, capsys):
    import runpy

    make_images(tmp_path / "pics", n=1, corrupt=False)
    chars = write_characters(tmp_path / "c.yaml", CHARACTERS[:1])
    job = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "generate_data.py"))
    argv = ["--characters", str(chars), "--images", str(tmp_path / "pics"), "--out", str(tmp_path / "o")]
    assert job["main"]([*argv, "--estimate-only"]) == 0
    assert json.loads(capsys.readouterr().out)["calls"]["comment"] == 1
    assert job["main"]([*argv, "teacher.max_concurrency=0"]) == 2
    assert "teacher.max_concurrency" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["openai.yaml", "vllm.yaml"])
def test_shipped_generate_configs_load(name):
    from mmrole.datagen.config import load_generate_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_generate_config(root / "configs" / "datagen" / name, ["characters=c.yaml", "images=p", "out=o"])
    assert cfg.teacher.model and cfg.teacher.max_concurrency >= 1
    with pytest.raises(ConfigError, match="teacher.max_concurency"):
        load_generate_config(root / "configs" / "datagen" / name, ["teacher.max_concurency=3"])
