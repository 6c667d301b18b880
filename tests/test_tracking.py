"""Experiment tracking: every record of the metrics sink reaches real MLflow (local file store) and TensorBoard; the
run's config, train metrics, eval loss and final model path are read back with the MLflow client; a restarted
attempt continues the same MLflow run; bad ``report_to`` / ``tracking`` keys are refused naming the key."""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import pytest

from mmrole.train import checkpoint as ckpt
from mmrole.train.config import ConfigError, TrainJobConfig, load_config
from mmrole.train.metrics import MetricsSink, StepStats, read_metrics
from mmrole.train.trackers import flatten_config, numeric_fields


def _tracker(module: str):
    """The tracker package: the suite installs the tracking extra (scripts/test.sh), so under CI a missing one is a
    failure; on a laptop without the extra these tests skip."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason="the tracking extra (pip install 'mmrole[tracking]')")


mlflow = _tracker("mlflow")


def _job(tmp_path: Path, *overrides: str) -> TrainJobConfig:
    base = {
        "run_name": "trk",
        "output_dir": str(tmp_path / "runs"),
        "model": {"model_path": "/models/tiny"},
        "data": {"prepared": "/data/prepared"},
    }
    return load_config(None, list(overrides), defaults=base)


def _step(step: int, loss: float) -> dict:
    return StepStats(step, loss, 1e-3, 4, 100, 50, 40, 0.5, 0.01, grad_norm=1.5).as_dict()


def _commit_fake(run_dir: Path, step: int) -> Path:
    t = ckpt.tmp_dir(run_dir, step, "x")
    (t / ckpt.HF_DIR).mkdir(parents=True)
    (t / ckpt.HF_DIR / "model.safetensors").write_bytes(b"w")
    ckpt.write_state(t, {"step": step})
    return ckpt.commit(t, step)


def test_numeric_fields_and_flatten():
    rec = {"step": 3, "time": 1.0, "loss": 2.5, "lr": 1e-4, "ok": True, "eval_loss": 1.25, "name": "x"}
    assert numeric_fields(rec) == {"train/loss": 2.5, "train/lr": 1e-4, "eval/loss": 1.25}
    # Events carry only their eval_* numbers as metrics.
    assert numeric_fields({"event": "eval", "step": 3, "eval_loss": 0.5, "rows": 10}) == {"eval/loss": 0.5}
    assert flatten_config({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}


def test_mlflow_and_tensorboard_get_config_metrics_eval_and_final_model(tmp_path):
    cfg = _job(tmp_path, "report_to=[tensorboard,mlflow]", "tracking.experiment=exp1", "train.lr=0.002")
    run_dir = cfg.run_dir
    sink = MetricsSink.for_job(cfg, run_dir, attempt="a1")
    assert [t.name for t in sink.trackers] == ["tensorboard", "mlflow"]
    sink.event("start", world_size=1)
    for s, loss in ((1, 3.0), (2, 2.5), (3, 2.0)):
        sink.write(_step(s, loss))
    sink.write({"step": 3, "eval_loss": 2.2, "eval_rows": 16})
    sink.event("eval", step=3, eval_loss=2.1)
    final = _commit_fake(run_dir, 3)
    sink.event("end", step=3)
    sink.close()

    client = mlflow.tracking.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("exp1")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trk"
    assert run.data.params["train.lr"] == "0.002" and run.data.params["report_to"] == '["tensorboard", "mlflow"]'
    assert run.data.params["model.model_path"] == "/models/tiny"
    losses = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(losses) == [(1, 3.0), (2, 2.5), (3, 2.0)]
    evals = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/loss"))
    assert evals == [(3, 2.1), (3, 2.2)]
    assert run.data.metrics["train/grad_norm"] == 1.5
    assert run.data.tags["final_model"] == str(final / ckpt.HF_DIR)
    assert run.data.tags["mmrole.final_step"] == "3"
    # The jsonl file still holds every record; TensorBoard wrote its event file.
    recs = read_metrics(run_dir)
    assert [r.get("event") for r in recs if "event" in r] == ["start", "eval", "end"]
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())


def test_restarted_attempt_continues_the_same_mlflow_run(tmp_path):
    cfg = _job(tmp_path, "report_to=[mlflow]")
    sink = MetricsSink.for_job(cfg, cfg.run_dir, attempt="a1")
    sink.write(_step(1, 3.0))
    sink.write(_step(2, 2.9))  # the worker dies here: no close
    sink._f.close()
    again = MetricsSink.for_job(cfg, cfg.run_dir, attempt="a2")
    again.write(_step(2, 2.8))  # the redone step
    again.write(_step(3, 2.7))
    again.close()
    client = mlflow.tracking.MlflowClient(tracking_uri=(cfg.run_dir / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("mmrole").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert hist == [(1, 3.0), (2, 2.8), (2, 2.9), (3, 2.7)]
    # No checkpoint was committed: the final model is logged as None, not invented.
    assert runs[0].data.tags["final_model"] == "None"


def test_old_signature_and_defaults(tmp_path):
    cfg = _job(tmp_path)
    assert cfg.report_to == ["tensorboard"] and cfg.tracking.wandb_mode == "auto"
    sink = MetricsSink(tmp_path / "r", "a", tensorboard=False)
    assert sink.trackers == []
    sink.write(_step(1, 1.0))
    sink.close()
    assert read_metrics(tmp_path / "r")[0]["loss"] == 1.0 and not (tmp_path / "r" / "mlruns").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("report_to=[tensorboard,neptune]", "report_to"),
        ("report_to=[mlflow,mlflow]", "report_to"),
        ("tracking.wandb_mode=sometimes", "tracking.wandb_mode"),
        ("tracking.experiment=", "tracking.experiment"),
    ],
)
def test_bad_tracking_config_names_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _job(tmp_path, override)


def test_wandb_offline_without_api_key(tmp_path, monkeypatch):
    """W&B in its offline mode (no key, no network): the run's records land in <run_dir>/wandb/offline-run-*."""
    _tracker("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = _job(tmp_path, "report_to=[wandb]", "tracking.wandb_project=proj", "train.lr=0.003")
    sink = MetricsSink.for_job(cfg, cfg.run_dir, attempt="a1")
    (tracker,) = sink.trackers
    assert tracker.run.settings.mode == "offline" and tracker.run.config["train"]["lr"] == 0.003
    sink.write(_step(1, 3.0))
    sink.write({"step": 1, "eval_loss": 2.5})
    final = _commit_fake(cfg.run_dir, 1)
    sink.close()
    (log,) = (cfg.run_dir / "wandb").glob("offline-run-*/*.wandb")
    needles = [n.encode() for n in ("train/loss", "eval/loss", str(final / ckpt.HF_DIR), "proj")]
    deadline = time.time() + 30  # wandb's service process may still be flushing the run file after finish()
    while not all(n in log.read_bytes() for n in needles) and time.time() < deadline:
        time.sleep(0.5)
    data = log.read_bytes()
    assert [n for n in needles if n not in data] == []
