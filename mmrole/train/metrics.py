"""Per-step training metrics: throughput (samples and text/image tokens per second), time blocked on data, and the
sinks (stdout line, metrics.jsonl, TensorBoard). Pure: the shell feeds it numbers already reduced across ranks."""

from __future__ import annotations

import json
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
    return (
        f"step {d['step']}/{total_steps} ep {d['epoch']} loss {d['loss']:.4f} lr {d['lr']:.3e}{gn} | "
        f"{d['samples_per_s']:.2f} samples/s {d['text_tokens_per_s']:.0f}+{d['image_tokens_per_s']:.0f} "
        f"text+image tok/s | data wait {100 * d['data_wait_frac']:.0f}% | {d['step_time_s']:.2f}s/step"
    )


class MetricsSink:
    """Append metrics to ``<run_dir>/metrics.jsonl`` and (when tensorboardX is importable) ``<run_dir>/tb``.

    Each record carries an ``attempt`` id so steps redone after a failure are visible in the file."""

    def __init__(self, run_dir: str | Path, attempt: str, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.attempt = attempt
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception:  # tensorboardX missing or unusable: the jsonl file is the record
                self._tb = None

    def write(self, record: dict) -> None:
        rec = {"time": time.time(), "attempt": self.attempt, **record}
        self._f.write(json.dumps(rec, sort_keys=True) + "\n")
        self._f.flush()
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])

    def event(self, kind: str, **fields) -> None:
        """A non-step record (start, resume, checkpoint, end)."""
        self.write({"event": kind, **fields})

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


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
