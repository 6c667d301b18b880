"""DPO losses against hand computations, the pair sums, the DPO config, and the pair encoder (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmrole.rl.dpo import LOSSES, PairSums, dpo_loss


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_sigmoid_loss_matches_hand_computation():
    # h = (pi_c - ref_c) - (pi_r - ref_r) = (-10 + 12) - (-14 + 13) = 2 - (-1) = 3; beta h = 0.3
    out = dpo_loss(_t(-10.0), _t(-14.0), _t(-12.0), _t(-13.0), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.3)), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.2) and out.rejected_rewards.item() == pytest.approx(-0.1)
    assert out.margins.item() == pytest.approx(0.3) and out.correct.item() == 1.0


def test_label_smoothing_and_ipo_match_hand_computation():
    args = (_t(-10.0, -5.0), _t(-14.0, -4.0), _t(-12.0, -5.0), _t(-13.0, -5.0))
    sm = dpo_loss(*args, beta=0.5, label_smoothing=0.2)
    h = torch.tensor([3.0, -1.0], dtype=torch.float64)
    sp = lambda x: math.log(1 + math.exp(-x))  # noqa: E731  -log sigmoid(x)
    want = [0.8 * sp(0.5 * x) + 0.2 * sp(-0.5 * x) for x in h.tolist()]
    assert sm.losses.tolist() == pytest.approx(want, rel=1e-12)
    assert sm.correct.tolist() == [1.0, 0.0]
    ipo = dpo_loss(*args, beta=0.5, loss="ipo")
    assert ipo.losses.tolist() == pytest.approx([(3 - 1.0) ** 2, (-1 - 1.0) ** 2])


def test_gradients_flow_through_the_policy_only_and_point_the_right_way():
    pc, pr = _t(-3.0).requires_grad_(), _t(-3.0).requires_grad_()
    rc, rr = _t(-3.0).requires_grad_(), _t(-3.0).requires_grad_()
    for loss in LOSSES:
        pc.grad = pr.grad = None
        dpo_loss(pc, pr, rc, rr, beta=0.1, loss=loss).losses.sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), loss  # descent raises the chosen, lowers the rejected
        assert rc.grad is None and rr.grad is None
    # At h = 0 the sigmoid gradient is -beta/2 per pair.
    pc.grad = None
    dpo_loss(pc, pr, rc, rr, beta=0.1).losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dpo loss"):
        dpo_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), loss="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), beta=0.0)


def test_pair_sums_round_trip_and_means():
    s = PairSums()
    pc, pr = _t(-1.0, -2.0), _t(-3.0, -1.0)
    out = dpo_loss(pc, pr, _t(-1.0, -1.0), _t(-2.0, -2.0), beta=1.0)
    s.add(out, pc, pr)
    back = PairSums.from_list(s.as_list())
    m = back.means()
    assert m["pairs"] == 2 and m["reward_accuracy"] == 0.5
    assert m["reward_margin"] == pytest.approx(((0 + 1) + (-1 - 1)) / 2)
    assert m["logp_chosen"] == pytest.approx(-1.5) and m["logp_rejected"] == pytest.approx(-2.0)
    assert set(back.means("eval_")) == {"eval_" + k for k in m}


def test_dpo_config_is_typed_validated_and_defaults_to_the_preference_split(tmp_path):
    from mmrole.config import ConfigError
    from mmrole.rl.dpo_config import DPOJobConfig, load_dpo_config, reference_model_config
    from mmrole.train.config import TrainJobConfig

    smoke = Path(__file__).resolve().parents[1] / "configs" / "dpo_smoke_cpu.yaml"
    cfg = load_dpo_config(smoke, ["dpo.beta=0.2", "dpo.loss=ipo"])
    assert isinstance(cfg, DPOJobConfig) and isinstance(cfg, TrainJobConfig)
    assert cfg.dpo.beta == 0.2 and cfg.split == "pref_train" and cfg.data.packing is False
    assert DPOJobConfig.from_dict(cfg.to_dict()).dpo.loss == "ipo"  # what the workers rebuild
    for bad, key in (
        ("dpo.loss=hinge", "dpo.loss"),
        ("dpo.beta=0", "dpo.beta"),
        ("dpo.reference=cached", "dpo.reference"),
        ("data.packing=true", "data.packing"),
        ("dpo.nope=1", "dpo.nope"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_dpo_config(smoke, [bad])
    ref = reference_model_config(load_dpo_config(smoke, ["model.lora.r=4"]))
    assert ref.lora is None and ref.model_path == cfg.model.model_path
    ref = reference_model_config(load_dpo_config(smoke, [f"dpo.reference_model={tmp_path}"]))
    assert ref.model_path == str(tmp_path)


def test_pair_encoder_gives_chosen_then_rejected_with_one_prompt(tiny_models):
    from PIL import Image

    from mmrole.data.records import Sample
    from mmrole.models.config import VLMConfig
    from mmrole.models.encoding import SampleTooLong, build_encoder
    from mmrole.train.row_encoder import encode_pair

    lines = [f"human: line {i} " + "word " * 30 for i in range(6)]
    s = Sample(
        id="p1",
        system="You are Ada.",
        user_text="",
        image="x.png",
        target="short",
        role="Ada",
        other_role="human",
        script="S",
        dialogue_type="comment",
        k=1,
        prompt_head="HEAD\n",
        history_header="History:\n",
        history_lines=lines,
        history_footer="\n",
        prompt_tail="TAIL",
    )
    s.user_text = s.user_text_with_history()
    row = s.to_row() | {"rejected": "long " * 120}
    enc = build_encoder(VLMConfig(model_path=tiny_models["agent"], max_length=520))
    image = Image.new("RGB", (56, 56))
    c, r = encode_pair(enc, row, image)
    assert (c["id"], r["id"]) == ("p1", "p1::rejected")
    assert c["history_kept"] == r["history_kept"] < len(lines)  # the long reply cut history for both
    n_prompt = lambda e: int((e["labels"] != -100).argmax())  # noqa: E731  (the first supervised token)
    assert n_prompt(c) == n_prompt(r) and (c["input_ids"][: n_prompt(c)] == r["input_ids"][: n_prompt(r)]).all()
    with pytest.raises(SampleTooLong):
        encode_pair(enc, row | {"rejected": "long " * 2000}, image)


def _dpo_worker(rank: int, port: int, runs: list, result: str) -> None:
    """A world-1 gloo group running the real DPO recipe + DeepSpeed for each config: two optimizer steps on rows
    0-3 and 4-7 (2 micro-batches of 2 pairs each), their metrics written to ``result``."""
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    from mmrole.ray_dpo_recipe import DPORecipe
    from mmrole.ray_recipe import WorkerInfo
    from mmrole.rl.dpo_config import DPOJobConfig
    from mmrole.train.data_order import MicroBatchPlan

    out = []
    for cfg_dict in runs:
        cfg = DPOJobConfig.from_dict(cfg_dict)
        recipe = DPORecipe(cfg, cfg.run_dir, 8, WorkerInfo(0, 1, torch.device("cpu")))
        recipe.setup()
        recipe.setup_data()
        steps = []
        for rows in ((0, 1, 2, 3), (4, 5, 6, 7)):
            plans = [MicroBatchPlan(0, rows[:2], 0), MicroBatchPlan(0, rows[2:], 0)]
            micro = [e.samples for _, e in recipe.data.encoders.encode_local(plans)]
            o = recipe.optimizer_step(micro, 0.0)
            steps.append({"loss": o.totals.loss_sum, "samples": o.totals.samples, **o.metrics})
        out.append(
            {"steps": steps, "eval": recipe.evaluate(), "ref_file": (cfg.run_dir / "reference_logps.jsonl").is_file()}
        )
        recipe.close()
    Path(result).write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_online_and_precomputed_references_give_the_same_steps(tiny_models, tmp_path):
    """The real recipe (DeepSpeed ZeRO-2, gloo, a spawned rank): a frozen reference scoring each micro-batch and the
    log-probs precomputed once give the same DPO steps (length-normalised loss: means over reply tokens); step 1
    starts at loss log 2 with zero rewards."""
    import json
    import socket

    import torch.multiprocessing as mp
    from test_train_dpo_ray import write_learnable_pairs

    prefs = write_learnable_pairs(tmp_path)

    def cfg(name: str, reference: str) -> dict:
        return DPOJobConfig.from_dict(
            {
                "run_name": name,
                "output_dir": str(tmp_path / "runs"),
                "model": {"model_path": tiny_models["agent"], "max_length": 512},
                "data": {"prepared": str(prefs), "encode_actors": 0, "eval_rows": 4, "max_rows": 12},
                "train": {"global_batch_size": 4, "micro_batch_size": 2, "lr": 2e-3, "warmup_steps": 0},
                "scaling": {"num_workers": 1},
                "report_to": [],
                # per-token means: the precomputed table's counts and the online reference's own must agree too
                "dpo": {"beta": 0.5, "reference": reference, "loss": "sigmoid_norm"},
            }
        ).to_dict()

    from mmrole.rl.dpo_config import DPOJobConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "out.json"
    runs = [cfg("pre", "precomputed"), cfg("online", "online")]
    mp.spawn(_dpo_worker, args=(port, runs, str(result)), nprocs=1, join=True)
    pre, online = json.loads(result.read_text())
    assert pre["ref_file"] and not online["ref_file"]
    for run in (pre, online):
        first = run["steps"][0]
        assert first["samples"] == 4 and first["pairs"] == 4
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(first["reward_margin"]) < 1e-5
    for a, b in zip(pre["steps"] + [pre["eval"]], online["steps"] + [online["eval"]]):
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert pre["steps"][1]["reward_margin"] > 0 and pre["eval"]["eval_pairs"] == 4


def test_shipped_rl_configs_load_show_and_print(monkeypatch, capsys):
    """configs/dpo_*.yaml and configs/preferences_smoke_cpu.yaml load as their typed configs, `mmrole config show`
    detects their kind, and both jobs' --print-config resolves paths without starting anything."""
    import subprocess
    import sys

    import yaml

    from mmrole.config_cli import detect_kind, show
    from mmrole.rl.dpo_config import load_dpo_config
    from mmrole.rl.preferences import load_preference_config
    from mmrole.train.config import batch_geometry

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    gpu = load_dpo_config(repo / "configs" / "dpo_7b_8gpu.yaml")
    t = gpu.train
    assert gpu.scaling.num_workers == 8 and gpu.scaling.use_gpu and t.zero_stage == 3 and t.precision == "bf16"
    assert batch_geometry(t.global_batch_size, t.micro_batch_size, 8).grad_accum == 4
    assert gpu.dpo.reference == "precomputed" and gpu.data.eval_rows > 0
    pref = load_preference_config(repo / "configs" / "preferences_smoke_cpu.yaml")
    assert pref.samples_per_prompt == 4 and pref.generation.do_sample and pref.judge.kind == "local"
    for path, kind in (
        ("configs/dpo_smoke_cpu.yaml", "dpo"),
        ("configs/dpo_7b_8gpu.yaml", "dpo"),
        ("configs/preferences_smoke_cpu.yaml", "preferences"),
    ):
        assert detect_kind(yaml.safe_load((repo / path).read_text())) == kind
    shown = yaml.safe_load(show("configs/dpo_smoke_cpu.yaml", ["dpo.beta=0.3"]))
    assert shown["dpo"]["beta"] == 0.3 and shown["data"]["prepared"] == str(repo / "demo_out/preferences")
    for job, cfg in (("train_dpo", "dpo_smoke_cpu"), ("build_preferences", "preferences_smoke_cpu")):
        p = subprocess.run(
            [sys.executable, f"jobs/{job}.py", "--config", f"configs/{cfg}.yaml", "--print-config"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        assert str(repo / "demo_out") in p.stdout
    bad = subprocess.run(
        [sys.executable, "jobs/train_dpo.py", "--config", "configs/dpo_smoke_cpu.yaml", "dpo.loss=hinge"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("config error: dpo.loss:")
