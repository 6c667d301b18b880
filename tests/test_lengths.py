"""`mmrole data lengths`: the token-length report of a prepared split agrees row for row with what the training
encoder does at a given max_length (kept whole / kept with history shortened / rejected as too long)."""

from __future__ import annotations

import json
import shutil

import pytest

from mmrole.cli import main
from mmrole.data.images import load_image
from mmrole.data.prepared import PreparedDataError, images_root, iter_samples
from mmrole.models.encoding import SampleTooLong, build_encoder
from mmrole.train.lengths import format_length_report, measure_lengths

LIMIT = 48


@pytest.fixture(scope="module")
def report(demo_prepared, tiny_models):
    return measure_lengths(demo_prepared, tiny_models["agent"], split="train", limit=LIMIT)


def test_report_matches_the_training_encoder(report, demo_prepared, tiny_models):
    from mmrole.models.config import VLMConfig

    assert report.rows_in == LIMIT and len(report.rows) == LIMIT and not report.not_measured
    for r in report.rows:
        assert r.total == r.text + r.image and r.image > 0 and 0 < r.target < r.total and r.shortest <= r.total
    # A max_length in the middle of the distribution exercises all three outcomes.
    n = int(sorted(r.shortest for r in report.rows)[LIMIT // 2])
    keeps = report.keeps(n)
    assert keeps["kept_whole"] and keeps["kept_history_shortened"] and keeps["rejected_too_long"]
    enc = build_encoder(VLMConfig(model_path=tiny_models["agent"], max_length=n))
    root = images_root(demo_prepared)
    whole = shortened = too_long = 0
    by_id = {r.id: r for r in report.rows}
    for i, s in enumerate(iter_samples(demo_prepared, "train")):
        if i >= LIMIT:
            break
        try:
            e = enc.encode(s, load_image(root, s.image))
        except SampleTooLong:
            too_long += 1
            assert by_id[s.id].shortest > n
            continue
        if e["history_dropped"]:
            shortened += 1
        else:
            whole += 1
            assert len(e["input_ids"]) == by_id[s.id].total
    assert (keeps["kept_whole"], keeps["kept_history_shortened"], keeps["rejected_too_long"]) == (
        whole,
        shortened,
        too_long,
    )
    text = format_length_report(report, [n])
    assert f"max_length {n}: keeps {whole + shortened}/{LIMIT}" in text and "p95" in text


def test_cli_json_and_text(demo_prepared, tiny_models, capsys):
    rc = main(["data", "lengths", str(demo_prepared), "--model", tiny_models["agent"], "--limit", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["rows_measured"] == 8 and out["split"] == "train"
    assert [k["max_length"] for k in out["max_length"]] == [1024, 2048, 4096, 8192]
    assert out["tokens"]["image"]["min"] > 0 and out["tokens"]["total"]["p50"] >= out["tokens"]["text"]["p50"]
    rc = main(
        ["data", "lengths", str(demo_prepared), "--model", tiny_models["agent"], "--limit", "4"]
        + ["--max-length", "10"]
    )
    text = capsys.readouterr().out
    assert rc == 0 and "max_length 10: keeps 0/4" in text and "rejects 4 as too long (e.g. " in text
    assert main(["data", "lengths", str(demo_prepared), "--model", tiny_models["agent"], "--split", "nope"]) == 1
    assert "no split 'nope'" in capsys.readouterr().err


def test_rows_without_images_are_counted_not_dropped(demo_prepared, tiny_models, tmp_path):
    broken = tmp_path / "prep"
    shutil.copytree(demo_prepared, broken)
    m = json.loads((broken / "manifest.json").read_text())
    m["images_root"] = str(tmp_path / "no-images")
    (broken / "manifest.json").write_text(json.dumps(m))
    rep = measure_lengths(broken, tiny_models["agent"], limit=3)
    assert rep.rows_in == 3 and not rep.rows and rep.not_measured == {"image": 3}
    assert "image not found" in rep.not_measured_examples[0][1]
    with pytest.raises(PreparedDataError):
        measure_lengths(tmp_path / "missing", tiny_models["agent"])


def test_padding_and_packing_token_counts():
    from mmrole.train.lengths import packed_tokens, padded_tokens

    lengths = [5, 3, 8, 2, 7, 1]
    assert padded_tokens(lengths, 1) == sum(lengths)
    assert padded_tokens(lengths, 2) == 2 * 5 + 2 * 8 + 2 * 7
    assert padded_tokens(lengths, 4) == 4 * 8 + 2 * 7
    # First-fit decreasing into rows of 10: [8, 2], [7, 3], [5, 1] -> 3 packs of 10 tokens computed.
    assert packed_tokens(lengths, 10) == (30, 3)
    assert packed_tokens(lengths, 10, buffer=3) == (30, 3)  # [8], [5, 3] then [7, 2, 1]
    assert packed_tokens(lengths, 10, buffer=1) == (60, 6)  # no window to choose from: one row per pack
    with pytest.raises(ValueError, match="longer than max_length"):
        packed_tokens(lengths, 7)
