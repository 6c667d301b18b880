"""Token-weighted loss: the loss and gradients of an optimizer step do not depend on how its samples are split
into micro-batches or over ranks. Plain torch for the arithmetic; the real recipe with real DeepSpeed (ZeRO-2,
gloo, spawned processes) for 1 worker x 4 micro-batches, 1 worker x 1 micro-batch of 8 and 2 workers x 2."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ROWS = list(range(8))


def _encoded(tiny_models, tmp_path):
    from mmrole.train.row_encoder import RowEncoder
    from mmrole.train.synthetic import write_prepared

    prep = write_prepared(tmp_path / "prep", 12, seed=3)  # rows 8-11: held out for validation
    enc = RowEncoder({"model_path": tiny_models["agent"], "max_length": 512}, str(prep), "train")
    return prep, enc.encode_rows(ROWS).samples


def test_micro_batch_split_gives_the_same_loss_and_grads(tiny_models, tmp_path):
    from mmrole.models import VLMConfig, build_vlm
    from mmrole.train.step import backward_scale, count_target_tokens, summed_token_loss

    _, samples = _encoded(tiny_models, tmp_path)
    lengths = [int(s["num_target_tokens"]) for s in samples]
    assert len(set(lengths)) > 2  # ragged targets: a mean of per-micro-batch means would differ
    vlm = build_vlm(VLMConfig(model_path=tiny_models["agent"], device="cpu", dtype="float32"))
    model = vlm.model

    def step(groups):
        model.zero_grad()
        n = sum(count_target_tokens(s["labels"]) for g in groups for s in g)
        total = 0.0
        for g in groups:
            summed = summed_token_loss(model, vlm.to_device(vlm.pad_batch(g)))
            (summed * backward_scale(1, n)).backward()
            total += float(summed.detach())
        return total / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    loss1, g1 = step([samples])
    loss4, g4 = step([samples[i : i + 2] for i in range(0, 8, 2)])
    assert loss4 == pytest.approx(loss1, rel=1e-5)
    assert g1.keys() == g4.keys()
    for k in g1:
        torch.testing.assert_close(g4[k], g1[k], rtol=1e-4, atol=1e-6)
    # The old per-micro-batch mean weighs short samples more: its loss differs on these ragged samples.
    means = [float(model(**vlm.to_device(vlm.pad_batch(samples[i : i + 2]))).loss) for i in range(0, 8, 2)]
    assert abs(sum(means) / 4 - loss1) > 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe_worker(rank: int, world: int, port: int, runs: list, result_dir: str) -> None:
    """One process of a DeepSpeed group: for each (cfg dict, per-rank micro-batch row lists), build the recipe and
    run one optimizer step; write loss and grad norm."""
    import json

    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    torch.set_num_threads(1)  # as Ray Train workers run (OMP_NUM_THREADS=1): 2 ranks on 2 cores, no oversubscription
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mmrole.ray_train_recipe import SFTRecipe, WorkerInfo
    from mmrole.train.config import TrainJobConfig
    from mmrole.train.data_order import MicroBatchPlan

    out = []
    for cfg_dict, micro_rows in runs:
        cfg = TrainJobConfig.from_dict(cfg_dict)
        recipe = SFTRecipe(cfg, cfg.run_dir, 8, WorkerInfo(rank, world, torch.device("cpu")))
        recipe.setup()
        recipe.setup_data()
        plans = [MicroBatchPlan(0, tuple(rows), 0) for rows in micro_rows[rank]]
        micro = [encoded.samples for _, encoded in recipe.data.encoders.encode(plans)]
        totals = recipe.train_step(micro)
        gn = float(recipe.engine.get_global_grad_norm())
        ev = recipe.evaluate()
        out.append(
            {
                "loss": totals.loss_sum,
                "grad_norm": gn,
                "samples": totals.samples,
                "partitioned": recipe.partitioned_at_build,
                "packing": recipe.packing,
                "eval_loss": ev["eval_loss"],
                "eval_samples": ev["eval_samples"],
            }
        )
        recipe.close()
    if rank == 0:
        Path(result_dir, f"world{world}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ranks_and_accumulation_give_the_same_step(tiny_models, tmp_path):
    """Real recipe + DeepSpeed ZeRO-2: 1 worker x (4 x 2), 1 worker x (1 x 8) and 2 workers x (2 x 2) train the same
    8 ragged samples: the same token-weighted loss and gradient norm (fp32 tolerance)."""
    import json

    import torch.multiprocessing as mp

    from mmrole.train.config import TrainJobConfig

    prep, samples = _encoded(tiny_models, tmp_path)

    def cfg(name: str, world: int, micro: int, zero: int = 2) -> dict:
        return TrainJobConfig.from_dict(
            {
                "run_name": name,
                "output_dir": str(tmp_path / "runs"),
                "model": {"model_path": tiny_models["agent"], "max_length": 512},
                "data": {"prepared": str(prep), "encode_actors": 0, "eval_rows": 4},
                "train": {"global_batch_size": 8, "micro_batch_size": micro, "zero_stage": zero, "grad_clip": 0.0},
                "scaling": {"num_workers": world},
            }
        ).to_dict()

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(TESTS))
    one = [
        (cfg("a4", 1, 2), [[[0, 1], [2, 3], [4, 5], [6, 7]]]),
        (cfg("a1", 1, 8), [[ROWS]]),
        (cfg("z3", 1, 2, zero=3), [[[0, 1], [2, 3], [4, 5], [6, 7]]]),
    ]
    two = [(cfg("w2", 2, 2), [[[0, 1], [2, 3]], [[4, 5], [6, 7]]])]
    mp.spawn(_recipe_worker, args=(1, _free_port(), one, str(tmp_path)), nprocs=1, join=True)
    mp.spawn(_recipe_worker, args=(2, _free_port(), two, str(tmp_path)), nprocs=2, join=True)
    r1 = json.loads((tmp_path / "world1.json").read_text())
    r2 = json.loads((tmp_path / "world2.json").read_text())
    ref = r1[1]
    assert ref["samples"] == 8 and r1[0]["samples"] == 8 and r2[0]["samples"] == 8
    for r in (r1[0], r2[0], r1[2]):
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert all(r["packing"] for r in r1 + r2)
    # Validation on the 4 held-out rows (1 rank: 4; 2 ranks: 2 each): the same token-weighted loss.
    assert all(r["eval_samples"] == 4 for r in r1 + r2)
    for r in (r1[0], r2[0], r1[2]):
        assert r["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-4)  # Qwen2.5-VL packs by default
    # ZeRO-3 builds the model inside deepspeed.zero.Init: every parameter is partitioned from the start.
    assert r1[2]["partitioned"] and not r1[0]["partitioned"]


def test_packed_batch_gives_the_same_loss_and_grads(tiny_models, tmp_path):
    """Samples packed into rows (attention kept within each sample) = the same samples padded: summed token loss
    and gradients agree (fp32), and packing computes fewer tokens."""
    from mmrole.models import VLMConfig, build_vlm
    from mmrole.train.packing import packed_batch, padding_waste
    from mmrole.train.step import count_target_tokens, summed_token_loss

    _, samples = _encoded(tiny_models, tmp_path)
    vlm = build_vlm(VLMConfig(model_path=tiny_models["agent"], device="cpu", dtype="float32"))
    model = vlm.model
    lengths = [len(s["input_ids"]) for s in samples]
    max_length = 2 * max(lengths)

    def run(batch):
        model.zero_grad()
        loss = summed_token_loss(model, vlm.to_device(batch))
        loss.backward()
        return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    padded = vlm.pad_batch(samples)
    packed = packed_batch(vlm, samples, max_length)
    assert packed["input_ids"].shape[0] < len(samples) and packed["input_ids"].shape[1] <= max_length
    assert count_target_tokens(packed["labels"]) == count_target_tokens(padded["labels"])
    loss_pad, g_pad = run(padded)
    loss_pack, g_pack = run(packed)
    assert loss_pack == pytest.approx(loss_pad, rel=1e-5)
    for k in g_pad:
        torch.testing.assert_close(g_pack[k], g_pad[k], rtol=1e-4, atol=1e-5)
    assert padding_waste(lengths, 8, max_length, True) < padding_waste(lengths, 8, max_length, False)
