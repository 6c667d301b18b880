"""bench/bench_train_gpu.py is ready for a GPU: setups parse, FLOPs are counted per packed sample, and its CPU dry run
(tiny model, same code path) prints the table; a packed micro-batch gives the same loss as the same samples padded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_train_gpu as bench  # noqa: E402


def test_parse_setup():
    s = bench.parse_setup("ds2:fa2:liger:ckpt:bucket=2e8:nooverlap")
    assert (s.engine, s.zero, s.attn, s.liger, s.ckpt, s.bucket, s.overlap) == (
        "ds",
        2,
        "flash_attention_2",
        True,
        True,
        200_000_000,
        False,
    )
    assert bench.parse_setup("torch:sdpa:pad").pad
    for bad in ("jax:sdpa", "ds2:turbo", "torch:bucket=5"):
        with pytest.raises(SystemExit, match="--configs"):
            bench.parse_setup(bad)


def test_flops_count_attention_within_samples_only():
    class A:  # a stand-in for the bench's argparse namespace: the tiny (dry-run) shape
        dry_run_cpu = True

    cfg = bench.model_config(A())
    params = {"lm_non_embedding": 1000, "vision": 300, "vision_merger": 100, "embedding": 64000, "total": 0}
    packed, palm = bench.model_flops(cfg, params, [100, 100], patches=16)
    one, _ = bench.model_flops(cfg, params, [200], patches=16)
    t = cfg.text_config
    # Same tokens: the same dense work; attention of two 100-token samples is half that of one of 200 tokens.
    dense = 6 * (1000 + t.vocab_size * t.hidden_size) * 200
    attn_two = 6 * t.num_hidden_layers * t.hidden_size * (100**2 + 100**2)
    attn_one = 6 * t.num_hidden_layers * t.hidden_size * 200**2
    vit_per_image = one - dense - attn_one
    assert vit_per_image > 0 and packed == pytest.approx(dense + attn_two + 2 * vit_per_image)
    assert palm - packed == pytest.approx(attn_two)  # PaLM convention: the full square, twice the causal half


def test_dry_run_cpu_prints_table_and_packed_equals_padded(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = bench.main(
        ["--dry-run-cpu", "--configs", "torch:sdpa,torch:sdpa:pad,torch:eager,torch:sdpa:liger", "--json", str(out)]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "| setup" in text and "| torch:sdpa " in text and "MFU" in text
    res = {r["setup"]: r for r in json.loads(out.read_text())["results"]}
    assert res["torch:sdpa:liger"]["status"].startswith("skipped") or res["torch:sdpa:liger"]["status"] == "ok"
    packed, padded, eager = res["torch:sdpa"], res["torch:sdpa:pad"], res["torch:eager"]
    assert packed["status"] == padded["status"] == eager["status"] == "ok"
    # Same weights, same samples: one packed row (block-diagonal attention) = a padded batch = eager attention.
    assert packed["losses"][0] == pytest.approx(padded["losses"][0], rel=1e-4)
    assert packed["losses"][0] == pytest.approx(eager["losses"][0], rel=1e-4)
    assert padded["computed_tokens"] > padded["real_tokens"] == packed["computed_tokens"]
    assert packed["tokens_per_s"] > 0 and packed["model_flops"] < packed["model_flops_palm"]


@pytest.mark.slow
def test_dry_run_cpu_deepspeed_zero2(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--dry-run-cpu", "--configs", "torch:sdpa,ds2:sdpa:bucket=1e6", "--json", str(out)]) == 0
    res = {r["setup"]: r for r in json.loads(out.read_text())["results"]}
    assert res["ds2:sdpa:bucket=1e6"]["status"] == "ok", res
    assert res["ds2:sdpa:bucket=1e6"]["losses"][0] == pytest.approx(res["torch:sdpa"]["losses"][0], rel=1e-4)
