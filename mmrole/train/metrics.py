"""Per-step training metrics: throughput (samples and text/image tokens per second), time blocked on data, and the
sinks (stdout line, metrics.jsonl, TensorBoard). Pure: the shell feeds it numbers already reduced across ranks."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


@dataclass
class StepStats:
    """Numbers of one optimizer step, summed over the micro-batches of the step and over all workers."""

    step: int
    loss: float
    lr: float
    samples: int
    text_tokens: int
    image_tokens: int
    target_tokens: int
    step_time_s: float  # wall time of the step on rank 0 (data wait included)
    data_wait_s: float  # time blocked on the data iterator, averaged over workers
    grad_norm: Optional[float] = None
    epoch: int = 0

    def as_dict(self) -> dict[str, Any]:
        t = max(self.step_time_s, 1e-9)
        d = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": self.loss,
            "lr": self.lr,
            "samples": self.samples,
            "samples_per_s": self.samples / t,
            "text_tokens_per_s": self.text_tokens / t,
            "image_tokens_per_s": self.image_tokens / t,
            "tokens_per_s": (self.text_tokens + self.image_tokens) / t,
            "target_tokens": self.target_tokens,
            "step_time_s": self.step_time_s,
            "data_wait_s": self.data_wait_s,
            "data_wait_frac": min(1.0, self.data_wait_s / t),
        }
        if self.grad_norm is not None:
            d["grad_norm"] = self.grad_norm
        return d


def progress_line(d: dict, total_steps: int) -> str:
    """One human-readable line per logged step."""
    gn = f" gnorm {d['grad_norm']:.3f}" if d.get("grad_norm") is not None else ""
    # Preference recipes (DPO) log their reward margin and accuracy beside the loss.
    pref = f" margin {d['reward_margin']:.4f} acc {d['reward_accuracy']:.2f}" if "reward_margin" in d else ""
    return (
        f"step {d['step']}/{total_steps} ep {d['epoch']} loss {d['loss']:.4f}{pref} lr {d['lr']:.3e}{gn} | "
        f"{d['samples_per_s']:.2f} samples/s {d['text_tokens_per_s']:.0f}+{d['image_tokens_per_s']:.0f} "
        f"text+image tok/s | data wait {100 * d['data_wait_frac']:.0f}% | {d['step_time_s']:.2f}s/step"
    )


class MetricsSink:
    """Append metrics to ``<run_dir>/metrics.jsonl`` and forward every record to the experiment trackers.

    Each record carries an ``attempt`` id so steps redone after a failure are visible in the file. Trackers
    (:mod:`mmrole.train.trackers`): ``report_to`` names them (tensorboard, mlflow, wandb); without it,
    ``tensorboard`` says whether TensorBoard is on (the older signature). ``config`` is logged once; on
    :meth:`close` the final model (the newest committed checkpoint's ``hf/`` folder) is logged too."""

    def __init__(
        self,
        run_dir: str | Path,
        attempt: str,
        tensorboard: bool = True,
        report_to: Optional[list[str]] = None,
        tracking: Any = None,
        config: Optional[dict] = None,
        run_name: Optional[str] = None,
    ):
        from mmrole.train.trackers import build_trackers

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.attempt = attempt
        self._f = open(self.path, "a", encoding="utf-8")
        names = list(report_to) if report_to is not None else (["tensorboard"] if tensorboard else [])
        self.trackers = build_trackers(names, self.run_dir, run_name or self.run_dir.name, tracking)
        if config is not None:
            self._each("log_config", config)

    @classmethod
    def for_job(cls, cfg: Any, run_dir: str | Path, attempt: str) -> MetricsSink:
        """The sink of a training job: trackers from ``cfg.report_to`` / ``cfg.tracking``, the config logged."""
        return cls(
            run_dir,
            attempt,
            report_to=cfg.report_to,
            tracking=cfg.tracking,
            config=cfg.to_dict(),
            run_name=cfg.run_name,
        )

    def _each(self, method: str, *args) -> None:
        """Call every tracker; one that fails is reported (stderr and metrics.jsonl) and dropped, so a tracker
        outage never stops training and is never silent."""
        for t in list(self.trackers):
            try:
                getattr(t, method)(*args)
            except Exception as e:
                self.trackers.remove(t)
                msg = f"{t.name} failed in {method} ({type(e).__name__}: {e}); it is off for the rest of the run"
                print(f"[mmrole] tracker {msg}", file=sys.stderr)
                self._append({"event": "tracker_error", "tracker": t.name, "error": msg})

    def _append(self, record: dict) -> dict:
        rec = {"time": time.time(), "attempt": self.attempt, **record}
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()
        return rec

    def write(self, record: dict) -> None:
        """One record (step metrics, ``{"step": N, "eval_loss": x}``, an event) to the file and every tracker."""
        self._each("log_record", self._append(record))

    def event(self, kind: str, **fields) -> None:
        """A non-step record (start, resume, checkpoint, eval, end)."""
        self.write({"event": kind, **fields})

    def final_model(self) -> tuple[Optional[str], dict]:
        """(path of the newest committed checkpoint's HF model, its step) as the driver will publish it."""
        from mmrole.train.checkpoint import HF_DIR, latest_complete

        e = latest_complete(self.run_dir, verify_files=False)
        if e is None:
            return None, {}
        return str(e.path / HF_DIR), {"final_step": e.step, "final_model_link": str(self.run_dir / "final_model")}

    def close(self) -> None:
        path, fields = self.final_model()
        self._each("log_final", path, fields)
        self._each("close")
        self._f.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def step_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "event" not in r and "loss" in r]


def redone_steps(records: list[dict]) -> list[int]:
    """Steps that were trained more than once (by different attempts), e.g. after a worker failure."""
    seen: dict[int, set] = {}
    for r in step_records(records):
        seen.setdefault(r["step"], set()).add(r.get("attempt"))
    return sorted(s for s, a in seen.items() if len(a) > 1)
