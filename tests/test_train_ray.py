"""Real Ray Train (V2) + real DeepSpeed on CPU (gloo): few trainer runs, many assertions each.

Run 1 (2 workers, ZeRO-2): a worker is SIGKILLed after step 5 (recovered: max_failures=1) and again after step 9
(failures exhausted: the job stops). Run 2 is the same command again: it resumes from the last committed
checkpoint and finishes. Together they check recovery, bounded redo, stop-and-rerun resume, falling loss, rejects,
checkpoint rotation and that the final checkpoint loads through the VLM layer and generates. Run 3 is the same
config never interrupted: the golden resume test (same per-step losses, same rows) compares it with runs 1+2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
EVERY = 3


def _overrides(tmp: Path, model: Path, prep: Path, run_name: str) -> list[str]:
    return [
        f"run_name={run_name}",
        f"output_dir={tmp / 'runs'}",
        f"model.model_path={model}",
        f"data.prepared={prep}",
        "data.max_rows=null",
        "data.prefetch_batches=3",
        "debug.record_rows=true",
        "train.epochs=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.lr=3e-3",
        "train.warmup_steps=1",
        "train.min_lr_ratio=0.3",
        "train.zero_stage=2",
        "tiny_model=null",
        f"checkpoint.every_steps={EVERY}",
        "checkpoint.num_to_keep=2",
        "scaling.num_workers=2",
        "scaling.max_failures=1",
        "debug.kill_at_steps=[5, 9]",
        "debug.kill_rank=1",
    ]


@pytest.fixture(scope="module")
def two_runs(ray_local, tmp_path_factory):
    """Run the same command twice; the first run is killed twice and stops, the second resumes and finishes."""
    from mmrole.models import make_tiny_vlm
    from mmrole.ray_train import run_training
    from mmrole.train.config import load_config
    from mmrole.train.synthetic import write_prepared

    tmp = tmp_path_factory.mktemp("train")
    prep = write_prepared(tmp / "prep", 48, seed=1, corrupt=[5], n_images=16)
    model = make_tiny_vlm(tmp / "tiny", "qwen2_5_vl", seed=0)
    cfg = load_config(REPO / "configs" / "smoke_cpu.yaml", _overrides(tmp, model, prep, "ft"))
    s1 = run_training(cfg, quiet=True)
    s2 = run_training(cfg, quiet=True)
    golden = load_config(
        REPO / "configs" / "smoke_cpu.yaml", _overrides(tmp, model, prep, "golden") + ["debug.kill_at_steps=[]"]
    )
    s3 = run_training(golden, quiet=True)
    return {"cfg": cfg, "s1": s1, "s2": s2, "tmp": tmp, "model": model, "prep": prep, "golden": golden, "s3": s3}


def _steps(records, attempt=None):
    return [r for r in records if "loss" in r and "event" not in r and (attempt is None or r["attempt"] == attempt)]


@pytest.mark.timeout(900)
def test_fault_tolerance_resume_rejects_and_reload(two_runs):
    from mmrole.train import checkpoint as ckpt
    from mmrole.train.metrics import read_metrics, redone_steps

    s1, s2, cfg = two_runs["s1"], two_runs["s2"], two_runs["cfg"]
    run = cfg.run_dir
    recs = read_metrics(run)
    attempts = list(dict.fromkeys(r["attempt"] for r in recs))
    assert len(attempts) == 3, attempts  # run 1, its automatic restart, run 2

    # Run 1: the kill after step 5 was recovered from the checkpoint of step 3; the kill after step 9 stopped it.
    assert not s1.ok and s1.final_step == 6 and "Worker" in s1.error
    resumes = [r for r in recs if r.get("event") == "resume"]
    assert [(r["from_step"], r["mode"]) for r in resumes] == [(3, "exact"), (6, "exact")]
    a1, a2, a3 = attempts
    assert max(r["step"] for r in _steps(recs, a1)) == 5
    assert [r["step"] for r in _steps(recs, a2)][0] == 4
    redone = redone_steps(recs)
    assert redone == [4, 5, 7, 8, 9] and len([s for s in redone if s <= 5]) <= EVERY
    # Exact resume: a redone step runs with the same learning rate as the first time.
    lr = {(r["attempt"], r["step"]): r["lr"] for r in _steps(recs)}
    assert all(lr[(a1, s)] == pytest.approx(lr[(a2, s)]) for s in (4, 5))
    assert all(lr[(a2, s)] == pytest.approx(lr[(a3, s)]) for s in (7, 8, 9))

    # Run 2 (same command): the step counter continues from the committed step 6, not from 1.
    assert s2.ok and s2.final_step == 12, s2
    assert [r["step"] for r in _steps(recs, a3)] == list(range(7, 13))
    last = {}
    for r in _steps(recs):
        last[r["step"]] = r
    assert sorted(last) == list(range(1, 13))
    first, final = sum(last[s]["loss"] for s in (1, 2, 3)) / 3, sum(last[s]["loss"] for s in (10, 11, 12)) / 3
    assert final < 0.85 * first, (first, final)
    assert all(last[s]["samples_per_s"] > 0 and last[s]["tokens_per_s"] > 0 for s in last)
    assert all(0 <= last[s]["data_wait_frac"] <= 1 for s in last)

    # The corrupt image is rejected by id (never silently dropped), and the counts add up.
    rejects = [json.loads(x) for x in (run / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects] == ["syn_00005"] and "corrupt_00005.png" in rejects[0]["reason"]
    assert s2.counts["in"] == 48 and s2.counts["rejected"] == 1 and s2.counts["out"] == 47
    assert s2.counts["samples_trained"] == 47  # every row but the rejected one, once

    # Only committed checkpoints count; rotation kept num_to_keep=2 complete ones and left no partials.
    entries = ckpt.scan(run)
    assert [(e.step, e.complete) for e in entries] == [(9, True), (12, True)]
    st = ckpt.read_state(entries[-1].path)
    assert st["step"] == 12 and st["world_size"] == 2 and st["zero_stage"] == 2
    assert (entries[-1].path / "deepspeed" / "state").is_dir()
    commits = sorted(run.glob("ray_commit-*"))
    assert len(commits) == 1 and json.loads((commits[0] / "commit.json").read_text())["step"] == 12
    assert Path(s2.final_model).resolve() == (entries[-1].path / "hf").resolve()


def _rows_by_step(run_dir: Path) -> dict[int, list[str]]:
    """Row ids of each step (all ranks, micro-batch order), from the last attempt that trained the step."""
    out: dict[tuple[int, int], list[str]] = {}
    for f in sorted((run_dir / "row_log").glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out[(r["step"], r["rank"])] = [i for ids in r["ids"] for i in ids]
    steps: dict[int, list[str]] = {}
    for (step, _rank), ids in sorted(out.items()):
        steps.setdefault(step, []).extend(ids)
    return steps


@pytest.mark.timeout(900)
def test_golden_resume_same_losses_and_rows(two_runs):
    """Killed mid-epoch (step 5, resumed from step 3) and stopped (step 9, re-run from step 6) vs never interrupted:
    the same per-step losses (fp32 on CPU: rel 1e-5) and the same rows at every step, each row once per epoch."""
    from mmrole.train.metrics import read_metrics

    assert two_runs["s3"].ok and two_runs["s3"].final_step == 12
    resumed, golden = {}, {}
    for r in _steps(read_metrics(two_runs["cfg"].run_dir)):
        resumed[r["step"]] = r["loss"]  # the last attempt of a redone step wins
    for r in _steps(read_metrics(two_runs["golden"].run_dir)):
        golden[r["step"]] = r["loss"]
    assert sorted(golden) == sorted(resumed) == list(range(1, 13))
    for step in golden:
        assert resumed[step] == pytest.approx(golden[step], rel=1e-5), step
    rows_resumed, rows_golden = _rows_by_step(two_runs["cfg"].run_dir), _rows_by_step(two_runs["golden"].run_dir)
    assert rows_resumed == rows_golden
    epoch = [i for step in sorted(rows_golden) for i in rows_golden[step]]
    assert len(epoch) == len(set(epoch)) == 47 and "syn_00005" not in epoch


def ray_data_context_changed() -> bool:
    """Whether building a pipeline left its settings in the process-wide Ray Data context."""
    import ray

    return ray.data.DataContext.get_current().execution_options.preserve_order


@pytest.mark.timeout(300)
def test_ray_data_ingest_keeps_the_plan_order(two_runs):
    """The rank's Ray Data pipeline (2 encoder actors on this node, blocks of 2 micro-batches, a tight memory budget)
    hands back every micro-batch in plan order with exactly the rows the in-thread encoder gives, rejects included;
    nothing is dropped, and the process-wide Ray Data context is left as it was."""
    from mmrole.ray_data_ingest import RankEncoders
    from mmrole.train.data_order import rank_micro_batches

    model = {"model_path": str(two_runs["model"]), "max_length": 512}
    # A budget of 1 MiB ahead (less than a few micro-batches: backpressure on every block) and actors on this node.
    enc = RankEncoders(
        2, 0.5, 2, memory_mb=1, local_node=True, model=model, prepared=str(two_runs["prep"]), split="train"
    )
    plans = [p for epoch in (0, 1) for p in rank_micro_batches(48, 7, epoch, 0, 2, 1, 3)]
    assert len(plans) == 16
    opts = enc.dataset(plans).context.execution_options
    assert opts.preserve_order and opts.resource_limits.object_store_memory == 2**20
    assert not ray_data_context_changed()
    via_ray_data = [
        (plan, [s["id"] for s in e.samples], [r["id"] for r in e.rejected]) for plan, e in enc.encode(plans)
    ]
    local = [(plan, [s["id"] for s in e.samples], [r["id"] for r in e.rejected]) for plan, e in enc.encode_local(plans)]
    enc.close()
    assert [p for p, _, _ in via_ray_data] == plans
    assert via_ray_data == local
    for plan, ids, rejected in via_ray_data:
        assert ids == [f"syn_{i:05d}" for i in plan.rows if f"syn_{i:05d}" not in rejected]
    assert {i for _, _, rej in via_ray_data for i in rej} <= {"syn_00005"}


@pytest.mark.timeout(300)
def test_final_checkpoint_loads_and_generates(two_runs):
    import torch
    from safetensors.torch import load_file

    from mmrole.data.images import load_image
    from mmrole.data.prepared import iter_samples
    from mmrole.models import GenerationParams, VLMConfig, build_vlm

    final = Path(two_runs["s2"].final_model)
    vlm = build_vlm(VLMConfig(model_path=str(final), device="cpu"))
    sample = next(s for s in iter_samples(two_runs["prep"], "train") if s.id != "syn_00005")
    image = load_image(two_runs["prep"] / "images", sample.image)
    out = vlm.generate(
        [sample, sample], [image, image], GenerationParams(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    )
    assert len(out) == 2 and out[0] == out[1] and out[0].strip()
    trained = load_file(str(final / "model.safetensors"))
    base = load_file(str(two_runs["model"] / "model.safetensors"))
    assert trained.keys() == base.keys()
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(changed) > len(base) // 2  # full fine-tuning moved most tensors
    with torch.no_grad():
        loss = vlm.loss(vlm.pad_batch([vlm.encode(sample, image)]))
    assert torch.isfinite(loss)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resize_to_one_worker_zero3_resumes_from_weights(two_runs):
    """An elastic-style restart at another world size with ZeRO-3: the partitioned optimizer state cannot be
    reused, so training continues from the HF weights with the step counter kept, and ZeRO-3 saves a
    consolidated HF model (gathered module by module). The second epoch trains every row once."""
    import torch

    from mmrole.ray_train import run_training
    from mmrole.train.config import load_config
    from mmrole.train.metrics import read_metrics

    tmp, src = two_runs["tmp"], two_runs["cfg"].run_dir
    dst = tmp / "runs" / "ft-z3"
    shutil.copytree(src / "checkpoints", dst / "checkpoints")
    cfg = load_config(
        REPO / "configs" / "smoke_cpu.yaml",
        _overrides(tmp, two_runs["model"], two_runs["prep"], "ft-z3")
        + [
            "scaling.num_workers=1",
            "train.zero_stage=3",
            "train.epochs=2",
            "debug.kill_at_steps=[]",
            "checkpoint.every_steps=100",
            "data.encode_actors=0",
        ],
    )
    s = run_training(cfg, quiet=True)
    assert s.ok, s
    assert s.counts["rejected"] == 1
    epoch1 = [i for step, ids in _rows_by_step(dst).items() if step > 12 for i in ids]
    assert len(epoch1) == len(set(epoch1)) == 47
    recs = read_metrics(dst)
    resume = next(r for r in recs if r.get("event") == "resume")
    assert (resume["from_step"], resume["mode"]) == (12, "weights") and "world_size=2" in resume["reason"]
    steps = [r["step"] for r in recs if "loss" in r and "event" not in r]
    assert steps[0] == 13 and s.final_step == steps[-1] > 13
    from mmrole.models import VLMConfig, build_vlm

    trained = build_vlm(VLMConfig(model_path=s.final_model, device="cpu")).model.state_dict()
    base = build_vlm(VLMConfig(model_path=str(two_runs["model"]), device="cpu")).model.state_dict()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in base.items()}  # consolidated
    assert sum(not torch.equal(trained[k], base[k]) for k in base) > len(base) // 2
