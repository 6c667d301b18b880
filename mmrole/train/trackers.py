"""Experiment trackers behind :class:`mmrole.train.metrics.MetricsSink`: TensorBoard (tensorboardX), MLflow and
Weights & Biases. Each receives every record the sink writes (train step metrics, eval loss, events), the run's
config once, and the final model path at the end. MLflow and W&B are optional (``pip install 'mmrole[tracking]'``)
and imported only when asked for.

One tracker run per training run: its id is kept in ``<run_dir>/tracking.json``, so a worker group restarted after
a failure (a new attempt) continues the same MLflow / W&B run instead of opening a new one."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

from mmrole.train.config import REPORT_TO as TRACKERS
from mmrole.train.config import TrackingSettings

IDS_FILE = "tracking.json"


class TrackerError(RuntimeError):
    """A tracker asked for in ``report_to`` that cannot be used; the message says what to install or set."""


def numeric_fields(record: dict) -> dict[str, float]:
    """Metric name -> value for the numbers of a record: ``eval_*`` keys go under ``eval/``, the numbers of a
    step record (no ``event``) under ``train/``; other event fields are not metrics."""
    out = {}
    is_event = "event" in record
    for k, v in record.items():
        if k in ("step", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k.startswith("eval_"):
            out[f"eval/{k[len('eval_') :]}"] = float(v)
        elif not is_event:
            out[f"train/{k}"] = float(v)
    return out


def flatten_config(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted keys with string values (what MLflow params and W&B config hold)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def _ids(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _save_id(run_dir: Path, key: str, value: str) -> None:
    ids = _ids(run_dir) | {key: value}
    tmp = run_dir / (IDS_FILE + ".part")
    tmp.write_text(json.dumps(ids, indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / IDS_FILE)


class Tracker:
    """What the sink calls; a tracker only overrides what it needs."""

    name = ""

    def log_config(self, config: dict) -> None:
        pass

    def log_record(self, record: dict) -> None:
        pass

    def log_final(self, final_model: Optional[str], fields: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log_record(self, record: dict) -> None:
        if "step" not in record:
            return
        for k, v in numeric_fields(record).items():
            self.writer.add_scalar(k, v, record["step"])

    def log_final(self, final_model: Optional[str], fields: dict) -> None:
        self.writer.add_text("final_model", str(final_model), int(fields.get("step", 0)))

    def close(self) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """MLflow through its client API (no global active run). Default store: a local file store under the run
    directory (``<run_dir>/mlruns``); ``tracking.mlflow_tracking_uri`` points elsewhere (a server, sqlite)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, experiment: str, tracking_uri: str = ""):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise TrackerError(
                f"report_to has mlflow but mlflow is not installed ({e}); pip install 'mmrole[tracking]'"
            ) from e
        uri = tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless told that it is wanted: the local default needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        key = f"mlflow_run_id@{uri}"
        run_id = _ids(run_dir).get(key)
        self.resumed = False
        if run_id:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
                self.resumed = True
            except Exception:  # the store was moved or wiped: start a new run rather than fail training
                run_id = None
        if not run_id:
            run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            _save_id(run_dir, key, run_id)
        self.run_id = run_id

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        if self.resumed:  # params are write-once in MLflow; the first attempt logged them
            return
        params = [Param(k, v[:6000]) for k, v in flatten_config(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log_record(self, record: dict) -> None:
        from mlflow.entities import Metric

        vals = numeric_fields(record)
        if vals and "step" in record:
            ts = int(1000 * record.get("time", 0))
            metrics = [Metric(k, v, ts, int(record["step"])) for k, v in vals.items()]
            self.client.log_batch(self.run_id, metrics=metrics)
        if "event" in record:
            self.client.set_tag(self.run_id, "mmrole.last_event", record["event"])

    def log_final(self, final_model: Optional[str], fields: dict) -> None:
        self.client.set_tag(self.run_id, "final_model", str(final_model))
        for k, v in fields.items():
            self.client.set_tag(self.run_id, f"mmrole.{k}", str(v))

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


class WandbTracker(Tracker):
    """W&B, offline (files under ``<run_dir>/wandb``, ``wandb sync`` later) unless WANDB_API_KEY is set or
    ``tracking.wandb_mode`` says otherwise."""

    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, project: str, mode: str = "auto", entity: Optional[str] = None):
        try:
            import wandb
        except ImportError as e:
            raise TrackerError(
                f"report_to has wandb but wandb is not installed ({e}); pip install 'mmrole[tracking]'"
            ) from e
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        key = "wandb_run_id"
        run_id = _ids(run_dir).get(key)
        if not run_id:
            run_id = uuid.uuid4().hex[:12]
            _save_id(run_dir, key, run_id)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=run_name,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(run_dir),
        )

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_record(self, record: dict) -> None:
        vals = numeric_fields(record)
        if vals and "step" in record:
            self.run.log(vals, step=int(record["step"]))

    def log_final(self, final_model: Optional[str], fields: dict) -> None:
        self.run.summary["final_model"] = str(final_model)
        for k, v in fields.items():
            self.run.summary[k] = v

    def close(self) -> None:
        self.run.finish()


def build_trackers(
    report_to: list[str], run_dir: str | Path, run_name: str, tracking: Any = None, strict: bool = True
) -> list[Tracker]:
    """The trackers named in ``report_to`` (``tracking``: a :class:`mmrole.train.config.TrackingSettings` or None
    for its defaults). A tracker that cannot start raises :class:`TrackerError` (``strict``) or is left out with a
    warning on stderr (TensorBoard without tensorboardX, as before)."""
    t = tracking or TrackingSettings()
    run_dir = Path(run_dir)
    out: list[Tracker] = []
    for name in dict.fromkeys(report_to):
        try:
            if name == "tensorboard":
                try:
                    out.append(TensorBoardTracker(run_dir))
                except ImportError as e:
                    print(f"[mmrole] TensorBoard logging off: tensorboardX unusable ({e})", file=sys.stderr)
            elif name == "mlflow":
                out.append(MLflowTracker(run_dir, run_name, t.experiment, t.mlflow_tracking_uri))
            elif name == "wandb":
                out.append(
                    WandbTracker(run_dir, run_name, t.wandb_project or t.experiment, t.wandb_mode, t.wandb_entity)
                )
            else:
                raise TrackerError(f"report_to: unknown tracker {name!r} (choose from {TRACKERS})")
        except TrackerError:
            if strict:
                raise
            print(f"[mmrole] tracker {name} left out", file=sys.stderr)
    return out
