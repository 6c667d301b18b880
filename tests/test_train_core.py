"""Training core without Ray: configs and overrides, LR schedule, batch geometry, DeepSpeed config, checkpoint
commit/rotation/resume rules, the Arrow row format of encoded samples (ragged images), metrics and rejects, the
reward-model data builder, and the shipped YAML configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from mmrole.train import checkpoint as ckpt
from mmrole.train.config import ConfigError, TrainJobConfig, batch_geometry, load_config, total_optimizer_steps
from mmrole.train.ds_config import build_deepspeed_config, resolve_precision, split_decay
from mmrole.train.metrics import MetricsSink, StepStats, progress_line, read_metrics, redone_steps
from mmrole.train.rejects import RejectWriter, merge_rejects
from mmrole.train.schedule import make_schedule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def base(**kw) -> dict:
    d = {"run_name": "t", "model": {"model_path": "/m"}, "data": {"prepared": "/p"}}
    d.update(kw)
    return d


# ----------------------------------------------------------------------------------------------- config


def test_overrides_are_typed_and_nested(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run_name: a\nmodel: {model_path: /m}\ndata: {prepared: /p}\ntrain: {lr: 1.0e-5}\n")
    cfg = load_config(
        f,
        [
            "train.lr=2e-5",
            "run_name=x",
            "train.betas=[0.9,0.99]",
            "scaling.min_workers=1",
            "model.lora.r=16",
            "model.freeze_vision=true",
            "data.encode_actors=3",
            "train.max_steps=null",
            "checkpoint.every_steps=7",
        ],
    )
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)  # "2e-5" is a string to PyYAML
    assert cfg.run_name == "x" and cfg.train.betas == [0.9, 0.99] and cfg.scaling.min_workers == 1
    assert cfg.model.lora is not None and cfg.model.lora.r == 16 and cfg.model.freeze_vision is True
    assert cfg.data.encode_actors == 3 and cfg.checkpoint.every_steps == 7
    assert cfg.split == "train" and cfg.run_dir == Path("runs").resolve() / "x"
    # Round trip through YAML gives the same config.
    again = TrainJobConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=1", "train.lrr"),
        ("train.lr=fast", "train.lr"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("scaling.min_workers=5", "scaling.min_workers"),
        ("train.schedule=linear", "train.schedule"),
        ("run_name=a/b", "run_name"),
        ("model.dtype=int3", "model"),
        ("checkpoint.num_to_keep=0", "checkpoint.num_to_keep"),
        ("train.global_batch_size=1", "train.global_batch_size"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, override, needle):
    f = tmp_path / "c.yaml"
    f.write_text(
        "run_name: a\nmodel: {model_path: /m}\ndata: {prepared: /p}\nscaling: {num_workers: 2}\n"
        "train: {micro_batch_size: 2}\n"
    )
    with pytest.raises(ConfigError) as ei:
        load_config(f, [override])
    assert needle in str(ei.value)


def test_missing_file_and_required_keys(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="model"):
        TrainJobConfig.from_dict({"run_name": "a", "data": {"prepared": "/p"}})
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"], defaults=base())


@pytest.mark.parametrize(
    "name",
    [
        "smoke_cpu.yaml",
        "smoke_cpu_rm.yaml",
        "agent_7b_8gpu.yaml",
        "reward_model_7b_8gpu.yaml",
        "agent_7b_lora_1gpu.yaml",
        "agent_32b_16gpu.yaml",
    ],
)
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    if "7b_8gpu" in name:  # the paper's recipe
        t = cfg.train
        assert (t.global_batch_size, t.lr, t.weight_decay, t.betas) == (256, 1e-5, 0.05, [0.9, 0.95])
        assert t.zero_stage == 3 and t.precision == "bf16" and cfg.model.freeze_vision
        assert cfg.scaling.num_workers == 8 and cfg.scaling.use_gpu
        assert (t.epochs, cfg.model.max_length) == ((3, 3072) if cfg.kind == "agent" else (10, 4096))
    if "lora" in name:
        assert cfg.model.lora is not None and cfg.scaling.num_workers == 1
    if name.startswith("smoke"):
        assert cfg.train.zero_stage == 2 and cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
    if "32b" in name:
        t = cfg.train
        assert cfg.scaling.num_workers == 16 and t.zero_stage == 3 and t.precision == "bf16"
        assert batch_geometry(t.global_batch_size, t.micro_batch_size, 16).grad_accum == 16
        ds = build_deepspeed_config(t, batch_geometry(256, 1, 16), "cuda")
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["train_batch_size"] == 256


def test_memory_estimate_for_a_16_gpu_run(tiny_encoder):
    """DeepSpeed's estimator on the meta-device model: per-GPU figures for 2 nodes x 8 GPUs."""
    from mmrole.ray_train import memory_estimate

    _, model_dir = tiny_encoder
    cfg = load_config(CONFIGS / "agent_32b_16gpu.yaml", [f"model.model_path={model_dir}"])
    text = memory_estimate(cfg)
    assert "per GPU" in text and "2 nodes, 8 GPUs per node" in text


# ----------------------------------------------------------------------------------------------- schedule/geometry


def test_schedule_warmup_cosine_constant():
    s = make_schedule(100, "cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(55) == pytest.approx(0.55) and s(100) == pytest.approx(0.1)
    assert s(1000) == pytest.approx(0.1)  # clamped past the end
    assert all(s(i) >= s(i + 1) for i in range(10, 120))
    c = make_schedule(50, "constant", warmup_ratio=0.1)
    assert c.warmup_steps == 5 and c(2) == pytest.approx(0.6) and c(40) == 1.0
    assert make_schedule(3, warmup_ratio=0.9).warmup_steps == 3  # never longer than the run


def test_batch_geometry_keeps_global_batch_when_world_changes():
    assert batch_geometry(256, 4, 8).grad_accum == 8
    assert batch_geometry(256, 4, 4).grad_accum == 16  # elastic shrink: more accumulation, same global batch
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 256 .* 4 x 6 = 24; use 240 or 264"):
        batch_geometry(256, 4, 6)  # refused with the sizes that fit, never silently changed
    geo = batch_geometry(8, 2, 2)
    # 23 rows -> 11 per worker -> 6 micro-batches/epoch; 2 epochs -> 12 micro -> 6 steps with accumulation 2
    assert total_optimizer_steps(23, 2, geo) == 6 and total_optimizer_steps(23, 2, geo, max_steps=4) == 4


def test_deepspeed_config():
    cfg = TrainJobConfig.from_dict(
        base(train={"zero_stage": 3, "grad_clip": 0.5, "global_batch_size": 32, "micro_batch_size": 2})
    )
    geo = batch_geometry(32, 2, 4)
    d = build_deepspeed_config(cfg.train, geo, "cuda")
    assert d["train_batch_size"] == 32 and d["gradient_accumulation_steps"] == 4
    assert d["train_micro_batch_size_per_gpu"] == 2 and d["gradient_clipping"] == 0.5
    assert d["bf16"]["enabled"] and not d["fp16"]["enabled"]
    assert d["zero_optimization"]["stage"] == 3
    assert d["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in d  # client torch AdamW
    cpu = build_deepspeed_config(cfg.train, geo, "cpu")
    assert not cpu["bf16"]["enabled"] and not cpu["zero_optimization"]["overlap_comm"]
    with pytest.raises(ValueError, match="GPU"):
        resolve_precision("bf16", "cpu")
    cfg.train.offload_optimizer = True
    off = build_deepspeed_config(cfg.train, geo, "cuda")
    assert off["optimizer"]["type"] == "AdamW" and off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    decay, no = split_decay([("a.weight", 2), ("a.bias", 1), ("ln.weight", 1), ("model.norm.weight", 1)])
    assert decay == ["a.weight"] and set(no) == {"a.bias", "ln.weight", "model.norm.weight"}


# ----------------------------------------------------------------------------------------------- checkpoints


def _write_ckpt(run: Path, step: int, token: str = "a", commit: bool = True) -> Path:
    t = ckpt.tmp_dir(run, step, token)
    (t / "hf").mkdir(parents=True)
    (t / "hf" / "model.safetensors").write_bytes(b"x" * step)
    ckpt.write_state(t, {"step": step, "epoch": 0, "epoch_rows": 4 * step, "world_size": 2, "zero_stage": 2})
    return ckpt.commit(t, step) if commit else t


def test_commit_marks_then_renames(tmp_path):
    final = _write_ckpt(tmp_path, 5)
    assert final.name == "step_00000005" and not list(final.parent.glob(".tmp-*"))
    ok, why = ckpt.verify(final)
    assert ok, why
    marker = json.loads((final / ckpt.COMPLETE).read_text())
    assert sorted(marker["files"]) == ["hf/model.safetensors", "trainer_state.json"]
    assert marker["files"]["hf/model.safetensors"] == {"size": 5, "sha256": hashlib.sha256(b"x" * 5).hexdigest()}
    # A damaged checkpoint is not used: resume falls back to the previous complete one.
    _write_ckpt(tmp_path, 10)
    (tmp_path / "checkpoints/step_00000010/hf/model.safetensors").write_bytes(b"short")
    assert not ckpt.verify(tmp_path / "checkpoints/step_00000010")[0]
    assert ckpt.latest_complete(tmp_path).step == 5
    # Re-committing the same step goes to a new revision; the old one goes only once the new one is in place.
    again = _write_ckpt(tmp_path, 5, token="b")
    assert again.name == "step_00000005.r1" and ckpt.verify(again)[0]
    assert not (again.parent / "step_00000005").exists() and not list(again.parent.glob(".trash-*"))


def test_partial_checkpoints_do_not_count(tmp_path):
    _write_ckpt(tmp_path, 3)
    _write_ckpt(tmp_path, 6, commit=False)  # crashed while writing
    (tmp_path / "checkpoints/step_00000009").mkdir()  # a step dir without a marker
    entries = ckpt.scan(tmp_path)
    assert [(e.step, e.complete) for e in entries] == [(3, True), (6, False), (9, False)]
    assert ckpt.latest_complete(tmp_path).step == 3
    plan = ckpt.plan_resume(tmp_path, world_size=2, zero_stage=2)
    assert (plan.step, plan.epoch_rows, plan.mode) == (3, 12, "exact")
    assert ckpt.plan_resume(tmp_path, world_size=4, zero_stage=2).mode == "weights"  # ZeRO state is per rank
    assert ckpt.plan_resume(tmp_path / "nothing", 2, 2).mode == "fresh"


def test_rotation_never_leaves_zero_complete(tmp_path):
    for s in (2, 4, 6, 8):
        _write_ckpt(tmp_path, s)
    active = _write_ckpt(tmp_path, 10, token="live", commit=False)
    deleted = ckpt.apply_rotation(tmp_path, num_to_keep=2, protect=[active])
    assert sorted(p.name for p in deleted) == ["step_00000002", "step_00000004"]
    assert [e.step for e in ckpt.complete_checkpoints(tmp_path)] == [6, 8] and active.is_dir()
    # Even if only partial dirs are newer, the newest complete one survives.
    ckpt.apply_rotation(tmp_path, num_to_keep=1)
    assert [e.step for e in ckpt.scan(tmp_path)] == [8]
    entries = ckpt.scan(tmp_path)
    assert ckpt.rotation_plan(entries, 1) == []
    with pytest.raises(ValueError):
        ckpt.rotation_plan(entries, 0)


# ----------------------------------------------------------------------------------------------- rows


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    from mmrole.models import make_tiny_vlm
    from mmrole.models.encoding import SampleEncoder
    from mmrole.models.processor import build_processor

    d = make_tiny_vlm(tmp_path_factory.mktemp("tiny") / "m", "qwen2_5_vl")
    return SampleEncoder(build_processor(str(d)), "qwen2_5_vl", 512), d


def test_rows_roundtrip_ragged_images(tiny_encoder):
    """Encoded samples with different image sizes survive the Arrow row format, re-batching and padding."""
    import pyarrow as pa

    from mmrole.data.records import Sample
    from mmrole.models.tiny import tiny_image
    from mmrole.train.rows import batch_token_counts, decode_table, encode_table, spec_from_encoded

    enc, _ = tiny_encoder
    samples = [
        Sample(
            id=f"s{i}",
            system="sys",
            user_text="look " * (i + 1),
            image="x.png",
            target="ok " * (i + 1),
            role="r",
            other_role="o",
            script="",
            dialogue_type="comment",
            k=1,
        )
        for i in range(4)
    ]
    sizes = [(56, 56), (140, 84), (98, 126), (70, 140)]
    encoded = [enc.encode(s, tiny_image(i, size)) for i, (s, size) in enumerate(zip(samples, sizes))]
    assert len({e["pixel_values"].shape[0] for e in encoded}) > 1  # ragged
    spec = spec_from_encoded(encoded[0])
    t1, t2 = encode_table(encoded[:1], spec), encode_table(encoded[1:], spec)
    empty = encode_table([], spec)
    assert empty.num_rows == 0 and empty.schema == t1.schema
    table = pa.concat_tables([t1, empty, t2]).slice(1)  # re-chunked and offset, as Ray Data may hand it over
    rows = decode_table(table)
    assert [r["id"] for r in rows] == ["s1", "s2", "s3"]
    for r, e in zip(rows, encoded[1:]):
        for k in ("input_ids", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
            np.testing.assert_array_equal(r[k], e[k])
            assert r[k].dtype == e[k].dtype
    batch = enc.pad_batch(rows)
    assert batch["pixel_values"].shape[0] == sum(e["pixel_values"].shape[0] for e in encoded[1:])
    assert batch["image_grid_thw"].shape == (3, 3) and batch["input_ids"].shape[0] == 3
    assert batch_token_counts(rows) == (
        sum(e["num_text_tokens"] for e in encoded[1:]),
        sum(e["num_image_tokens"] for e in encoded[1:]),
        sum(e["num_target_tokens"] for e in encoded[1:]),
    )


def test_encoded_rows_bytes_roundtrip_without_pickle(tiny_encoder):
    """What the Ray Data ingest carries per micro-batch: ragged samples (arrays bit-equal, same dtypes, scalars and
    ids) and the rejects come back from Arrow IPC bytes; a micro-batch whose rows were all rejected too."""
    from mmrole.data.records import Sample
    from mmrole.models.tiny import tiny_image
    from mmrole.train.row_encoder import EncodedRows

    enc, _ = tiny_encoder
    samples = [
        enc.encode(
            Sample(
                id=f"s{i}",
                system="sys",
                user_text="look " * (i + 1),
                image="x.png",
                target="ok",
                role="r",
                other_role="o",
                script="",
                dialogue_type="comment",
                k=1,
            ),
            tiny_image(i, size),
        )
        for i, size in enumerate([(56, 56), (140, 84)])
    ]
    rejected = [{"id": "s9", "stage": "too_long", "reason": "too long: 900 tokens", "length": 900}]
    blob = EncodedRows(samples, rejected).to_bytes()
    assert b"\x80" not in blob[:2]  # not a pickle stream
    back = EncodedRows.from_bytes(blob)
    assert back.rejected == rejected and len(back.samples) == 2
    for got, want in zip(back.samples, samples):
        assert set(got) == set(want)
        for k, v in want.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(got[k], v)
                assert got[k].dtype == v.dtype
            else:
                assert got[k] == v, k
    empty = EncodedRows.from_bytes(EncodedRows([], rejected).to_bytes())
    assert empty.samples == [] and empty.rejected == rejected


def test_row_encoder_keeps_order_and_rejects_bad_rows_by_id(tiny_encoder, tmp_path):
    """Rows by index, encoded in request order; a corrupt image and a too-long sample become rejects (by id)."""
    import pyarrow.parquet as pq

    from mmrole.train.row_encoder import RowEncoder
    from mmrole.train.synthetic import write_prepared

    _, model_dir = tiny_encoder
    prep = write_prepared(tmp_path / "prep", 6, corrupt=[1])
    shard = next((prep / "train").glob("*.parquet"))
    table = pq.read_table(shard)
    targets = table.column("target").to_pylist()
    targets[3] = "word " * 2000  # cannot fit max_length even without history
    pq.write_table(table.set_column(table.schema.get_field_index("target"), "target", [targets]), shard)
    enc = RowEncoder({"model_path": str(model_dir), "max_length": 512}, str(prep), "train", 5, str(tmp_path / "rej"))
    assert enc.rows.n_rows == 5  # max_rows: the first rows in manifest order
    out = enc.encode_rows([4, 3, 2, 1, 0])
    assert [s["id"] for s in out.samples] == ["syn_00004", "syn_00002", "syn_00000"]
    assert [(r["id"], r["stage"]) for r in out.rejected] == [("syn_00003", "too_long"), ("syn_00001", "image")]
    assert out.rejected[0]["length"] > 512
    lines = [json.loads(x) for f in (tmp_path / "rej").glob("*.jsonl") for x in f.read_text().splitlines()]
    by_id = {r["id"]: r for r in lines}
    assert by_id["syn_00001"]["stage"] == "image" and "corrupt_00001.png" in by_id["syn_00001"]["reason"]
    assert len(lines) == 2


def test_local_encoders_start_no_ray(tiny_encoder, tmp_path):
    """``data.encode_actors: 0`` encodes in a thread: a process without Ray (a spawned DeepSpeed rank, a debugging
    run) gets its micro-batches in plan order and no Ray instance is started behind its back. Run in a fresh
    interpreter: that is the process the bug hit, and this test's own process may hold the session's Ray."""
    import subprocess
    import sys

    from mmrole.train.synthetic import write_prepared

    _, model_dir = tiny_encoder
    prep = write_prepared(tmp_path / "prep", 4)
    script = f"""
import json, ray
from mmrole.ray_data_ingest import RankEncoders
from mmrole.train.data_order import MicroBatchPlan
enc = RankEncoders(0, 1.0, 2, local_node=True, model={{"model_path": {str(model_dir)!r}, "max_length": 512}},
                   prepared={str(prep)!r}, split="train")
try:
    got = [[list(p.rows), [s["id"] for s in e.samples]] for p, e in enc.encode([MicroBatchPlan(0, (2, 0), 0)])]
finally:
    enc.close()
print(json.dumps({{"got": got, "ray_started": ray.is_initialized()}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"got": [[[2, 0], ["syn_00002", "syn_00000"]]], "ray_started": False}


def test_background_iterator_keeps_order_raises_in_order_and_closes_its_source():
    """The ingest's background thread: items in source order, a source error raised where it happened, and close()
    stops a source that is still producing (its cleanup runs: that is what stops a Ray Data pipeline)."""
    import threading

    from mmrole.ray_data_ingest import BackgroundIterator

    def numbers(n, fail_at=None, closed=None):
        try:
            for i in range(n):
                if i == fail_at:
                    raise ValueError(f"bad item {i}")
                yield i
        finally:
            if closed is not None:
                closed.set()

    assert list(BackgroundIterator(lambda: numbers(50), 3)) == list(range(50))
    it = BackgroundIterator(lambda: numbers(10, fail_at=4), 2)
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="bad item 4"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)
    closed = threading.Event()
    it = BackgroundIterator(lambda: numbers(10**9, closed=closed), 2)
    assert next(it) == 0
    it.close()
    assert closed.wait(10) and not it._thread.is_alive()


# ----------------------------------------------------------------------------------------------- metrics/rejects


def test_metrics_sink_and_redone_steps(tmp_path):
    a = MetricsSink(tmp_path, "att1", tensorboard=True)
    for s in (1, 2, 3):
        a.write(
            StepStats(
                step=s,
                loss=1.0 / s,
                lr=1e-3,
                samples=8,
                text_tokens=800,
                image_tokens=80,
                target_tokens=40,
                step_time_s=2.0,
                data_wait_s=0.5,
            ).as_dict()
        )
    a.close()
    b = MetricsSink(tmp_path, "att2", tensorboard=False)
    b.event("resume", from_step=2)
    b.write(
        StepStats(
            step=3,
            loss=0.3,
            lr=1e-3,
            samples=8,
            text_tokens=1,
            image_tokens=1,
            target_tokens=1,
            step_time_s=1.0,
            data_wait_s=0.0,
        ).as_dict()
    )
    b.close()
    recs = read_metrics(tmp_path)
    assert redone_steps(recs) == [3]
    d = recs[0]
    assert d["samples_per_s"] == 4.0 and d["tokens_per_s"] == 440.0 and d["data_wait_frac"] == 0.25
    assert "loss 1.0000" in progress_line(d, 3) and "25%" in progress_line(d, 3)
    assert list((tmp_path / "tb").iterdir())  # TensorBoard event file written


def test_rejects_merge_dedupes_across_epochs(tmp_path):
    for _ in range(2):  # two epochs (two actor processes) see the same bad row
        w = RejectWriter(tmp_path / "rejects")
        w.write("b", f"cannot decode b.png (object at {id(w):#x})", "image")
        w.write("a", "too long", "too_long")
        w.close()
    (tmp_path / "rejects" / "broken.jsonl").write_text('{"id": "c", "reason": "x", "stage": "image"}\n{"id": ')
    recs = merge_rejects(tmp_path)
    assert [r["id"] for r in recs] == ["a", "b", "c"]
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------------------------- reward-model data


def test_rm_data_from_published_reviews(sample_dir, tmp_path):
    from mmrole.data.reader import image_path_from_tag
    from mmrole.eval.parse import parse_scores
    from mmrole.train.rm_data import build_rm_data, find_review_files

    files = find_review_files(sample_dir / "eval")
    assert len(files) == 18  # 2 sets x 3 models x 3 types
    stats = build_rm_data(files, tmp_path, test_fraction=0.2, seed=0)
    d = stats.to_dict()
    assert d["in"] == d["out"] + d["rejected"] - d["rejected_by_reason"].get("bad_record", 0)
    assert d["out"] > 0.9 * d["in"]
    train = json.loads((tmp_path / "RM_data/train/rm_train.json").read_text())
    test = json.loads((tmp_path / "RM_data/test/rm_test.json").read_text())
    assert len(train) == d["out_train"] and len(test) == d["out_test"] and d["out_test"] > 0
    r = train[0]
    user, review = r["conversations"][0]["value"], r["conversations"][1]["value"]
    img, prompt = image_path_from_tag(user)
    assert img and img.endswith(".jpg") and "[Scores]" in prompt and r["system"]
    assert parse_scores(review)  # every review ends in a parseable pair
    # No sample straddles the split (all models/metrics of one sample on one side).
    sid = lambda rec: rec["id"].split("/", 1)[1].split("::")[0]  # noqa: E731
    assert not ({sid(x) for x in train} & {sid(x) for x in test})
    for line in (tmp_path / "RM_data/rejects.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["id"] and rec["reason"] and rec["file"]


def test_rm_data_rejects_inconsistent_reviews(tmp_path):
    from mmrole.train.rm_data import build_rm_data

    rec = {
        "id": "X_comment_COCO_1_1",
        "system": "s",
        "image": "a.jpg",
        "role": "Ada",
        "script": "S",
        "other_role": "a curious human",
        "conversations": [{"from": "user", "value": "q"}, {"from": "assistant", "value": "ref", "answer": "ans"}],
        "rm_review": {
            "Fluency": {"review": "Good. [Scores]: (7, 8)", "score": [7, 8]},
            "Coherency": {"review": "Good. [Scores]: (7, 8)", "score": [9, 8]},
            "Tone Consistency": {"review": "", "score": None},
        },
    }
    f = tmp_path / "eval" / "in-test_reviews" / "m" / "comment_test.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps([rec]))
    stats = build_rm_data([f], tmp_path / "out", test_fraction=0.0)
    assert stats.out_train == 1
    reasons = {r["metric"]: r["reason"] for r in stats.rejected}
    assert reasons["Coherency"].startswith("score_mismatch") and reasons["Tone Consistency"].startswith("no_score")
    assert len(stats.rejected) == 7  # 5 metrics absent + mismatch + failed
    out = json.loads((tmp_path / "out/RM_data/train/rm_train.json").read_text())
    assert out[0]["id"] == "m/X_comment_COCO_1_1::Fluency"


def test_rm_data_goes_through_prepare_and_encodes(tmp_path, tiny_encoder):
    """RM_data built for the demo dataset -> `prepare` -> rm_train shards whose rows encode (judge prompt + review)."""
    from mmrole.data.demo import build_demo
    from mmrole.data.prepare import prepare
    from mmrole.data.prepared import iter_samples
    from mmrole.models.tiny import tiny_image
    from mmrole.train.rm_data import demo_rm_builder

    counts = build_demo(tmp_path / "ds", seed=0, rm_builder=demo_rm_builder)
    assert counts["rm_train"] > 0 and counts["rm_rejected"] == 0
    prepare(tmp_path / "ds", tmp_path / "prep")
    rows = list(iter_samples(tmp_path / "prep", "rm_train"))
    assert len(rows) == counts["rm_train"] and rows[0].dialogue_type == "judge"
    assert rows[0].target.rstrip().endswith(")") and "[Scores]" in rows[0].target
    enc, _ = tiny_encoder
    big = type(enc)(enc.processor, enc.family, 4096)
    e = big.encode(rows[0], tiny_image(0))
    assert e["num_target_tokens"] > 5


def test_job_cli_print_config(tmp_path, capsys):
    from mmrole.train.cli import main

    assert main(["--config", str(CONFIGS / "smoke_cpu.yaml"), "--print-config", "train.lr=3e-3"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.003" in out and "kind: agent" in out
    assert main(["--config", str(CONFIGS / "smoke_cpu_rm.yaml"), "--print-config"], kind="agent") == 2
    assert main(["--config", str(CONFIGS / "smoke_cpu.yaml"), "train.zero_stage=9"]) == 2


def test_ray_commit_records_pruned_to_the_referenced_one(tmp_path):
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    from mmrole.ray_train import _prune_commit_records

    for name in ("ray_commit-step_00000003-a", "ray_commit-step_00000006-b", "ray_commit-step_00000012-c"):
        (tmp_path / name).mkdir()
    assert len(_prune_commit_records(tmp_path)) == 3  # no snapshot: nothing references them
    assert not list(tmp_path.glob("ray_commit-*"))
    for name in ("ray_commit-step_00000003-a", "ray_commit-step_00000012-c"):
        (tmp_path / name).mkdir()
    (tmp_path / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).write_text(
        json.dumps(
            {
                "checkpoint_results": [{"checkpoint_dir_name": "ray_commit-step_00000012-c"}],
                "latest_checkpoint_result": {"checkpoint_dir_name": "ray_commit-step_00000012-c"},
            }
        )
    )
    assert _prune_commit_records(tmp_path) == ["ray_commit-step_00000003-a"]
    assert [p.name for p in tmp_path.glob("ray_commit-*")] == ["ray_commit-step_00000012-c"]
    (tmp_path / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).write_text("{not json")
    assert _prune_commit_records(tmp_path) == []  # unreadable snapshot: touch nothing


def test_relative_paths_refused_under_ray_job_submit(monkeypatch):
    from mmrole.ray_train import _check_paths_for_cluster

    cfg = TrainJobConfig.from_dict(base(output_dir="runs"))
    _check_paths_for_cluster(cfg)  # a local run: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ValueError, match="output_dir"):
        _check_paths_for_cluster(cfg)
    _check_paths_for_cluster(TrainJobConfig.from_dict(base(output_dir="/shared/runs")))


# ----------------------------------------------------------------------------------------------- data order


def test_epoch_order_is_a_pure_function_and_resume_continues_the_prefix():
    from mmrole.train.data_order import epoch_permutation, micro_batches_left, rank_micro_batches

    p0, p1 = epoch_permutation(50, 7, 0), epoch_permutation(50, 7, 1)
    assert np.array_equal(p0, epoch_permutation(50, 7, 0)) and not np.array_equal(p0, p1)
    assert sorted(p0.tolist()) == list(range(50))

    def share(world, rank, start=0):
        return list(rank_micro_batches(50, 7, 0, start, world, rank, micro_batch=3))

    # 2 ranks: equal shares, disjoint, and after each micro-batch round the consumed rows are a prefix.
    a, b = share(2, 0), share(2, 1)
    assert len(a) == len(b) == micro_batches_left(50, 0, 2, 3) == 9
    for mb_a, mb_b in zip(a, b):
        assert mb_a.end_position == mb_b.end_position
        consumed = {r for m in a[: a.index(mb_a) + 1] + b[: b.index(mb_b) + 1] for r in m.rows}
        assert consumed == set(p0[: mb_a.end_position].tolist())
    # Stopped after 4 rounds and resumed at the same world size: exactly the rows of the uninterrupted run.
    pos = a[3].end_position
    assert share(2, 0, pos) == a[4:] and share(2, 1, pos) == b[4:]
    # Elastic: resumed at 3 ranks, no row of the epoch is trained twice.
    before = {r for m in a[:4] + b[:4] for r in m.rows}
    after = [r for rank in range(3) for m in share(3, rank, pos) for r in m.rows]
    assert len(after) == len(set(after)) and not before & set(after)
    assert len(before) + len(after) >= 50 - 3  # at most world-1 rows left over


# ----------------------------------------------------------------------------------------------- fail fast


def test_preflight_refuses_a_run_whose_rows_are_all_too_long(tiny_encoder, tmp_path, capsys):
    """Every row longer than model.max_length: the run fails before Ray starts, "ok": false, naming the reason and
    the key to change; the token-length figures are printed."""
    import time

    from mmrole.ray_train import run_training
    from mmrole.train.synthetic import write_prepared

    _, model_dir = tiny_encoder
    prep = write_prepared(tmp_path / "prep", 40)
    cfg = TrainJobConfig.from_dict(
        base(
            run_name="toolong",
            output_dir=str(tmp_path / "runs"),
            model={"model_path": str(model_dir), "max_length": 24},
            data={"prepared": str(prep)},
            train={"global_batch_size": 4, "micro_batch_size": 2},
            scaling={"num_workers": 2},
        )
    )
    import ray

    ray_was_up = ray.is_initialized()  # the session's shared Ray, when a Ray test ran first
    t0 = time.time()
    s = run_training(cfg, quiet=True)
    assert time.time() - t0 < 60
    assert not s.ok and s.final_model is None
    assert "too_long" in s.error and "model.max_length" in s.error and "40 of the first 40" in s.error
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["ok"] is False and summary["error"] == s.error
    out = capsys.readouterr().out
    assert "rows: 40 in, 40 measured" in out and "max_length 24: keeps 0/40" in out
    assert "model.max_length=" in s.error  # the length that would keep them all
    assert ray.is_initialized() == ray_was_up  # refused before any Ray was started


def test_reject_verdict_cap_and_zero_steps():
    from mmrole.train.preflight import reject_verdict

    assert reject_verdict(10, 100, {"image": 5}, 0.05) is None
    msg = reject_verdict(10, 100, {"too_long": 6, "image": 1}, 0.05)
    assert "7 of 100 rows rejected" in msg and "'too_long'" in msg and "model.max_length" in msg
    assert "trained 0 steps" in reject_verdict(0, 100, {}, 0.05)


def test_finished_run_answers_without_starting_ray(tmp_path):
    """Re-running a finished command: the driver sees summary.json/final.json and returns at once (no Ray)."""
    import subprocess
    import sys
    import time

    cfg = TrainJobConfig.from_dict(base(run_name="done", output_dir=str(tmp_path / "runs")))
    run = cfg.run_dir
    (run / "checkpoints" / "step_00000004" / "hf").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "final.json").write_text(json.dumps({"step": 4, "hf_model": str(run / "checkpoints/step_00000004/hf")}))
    (run / "summary.json").write_text(json.dumps({"ok": True, "final_step": 4, "final_model": str(run / "fm")}))
    conf = tmp_path / "c.yaml"
    conf.write_text(cfg.to_yaml())
    code = (
        "import sys; from mmrole.train.cli import main; rc = main(['--config', sys.argv[1]]); "
        "print('imported:', sorted(m for m in ('ray', 'torch', 'deepspeed') if m in sys.modules)); sys.exit(rc)"
    )
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code, str(conf)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "already complete: step 4" in out.stdout and "imported: []" in out.stdout
    assert time.time() - t0 < 20  # under 5 s on an idle machine: no Ray, no torch
    (run / "config.yaml").write_text(cfg.to_yaml().replace("lr: 1.0e-05", "lr: 2.0e-05"))
    from mmrole.train.finished import finished_run

    assert finished_run(cfg) is None  # another config: not the same run, train
