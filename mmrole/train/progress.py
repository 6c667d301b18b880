"""Driver-side progress of a training run, read from the run's ``metrics.jsonl`` while Ray Train runs: a tqdm bar
(steps, loss, rate, ETA) and one line per event (start/resume, checkpoint, epoch end, validation). Works the same
whether worker output reaches the console or not."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Optional


class MetricsFollower:
    """Follow ``<run_dir>/metrics.jsonl`` from its current end in a background thread."""

    def __init__(self, run_dir: Path, poll_s: float = 0.5):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.poll_s = poll_s
        self._offset = self.path.stat().st_size if self.path.is_file() else 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._bar = None

    def __enter__(self) -> MetricsFollower:
        self._thread = threading.Thread(target=self._run, name="mmrole-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._poll()
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._poll()

    def _poll(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind("\n")
        if end < 0:
            return
        self._offset += len(chunk[: end + 1].encode("utf-8"))
        for line in chunk[: end + 1].splitlines():
            try:
                self._show(json.loads(line))
            except ValueError:
                continue

    def _write(self, msg: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"[mmrole] {msg}")

    def _show(self, r: dict) -> None:
        from tqdm import tqdm

        ev = r.get("event")
        if ev in ("start", "resume"):
            total, start = r.get("total_steps", 0), r.get("from_step", 0)
            if self._bar is None:
                self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="train")
            else:
                self._bar.n = start
                self._bar.refresh()
            how = f"resumed from step {start} ({r.get('mode')})" if ev == "resume" else "started"
            self._write(
                f"{how}: {r.get('world_size')} worker(s), ZeRO-{r.get('zero_stage')}, {r.get('precision')}, "
                f"global batch {r.get('global_batch')} (micro {r.get('micro_batch')} x accum {r.get('grad_accum')}), "
                f"packing {'on' if r.get('packing') else 'off'}, {total} steps"
            )
        elif ev == "checkpoint":
            self._write(f"checkpoint step {r['step']} committed ({r.get('seconds', 0):.1f}s)")
        elif ev == "epoch_end":
            self._write(f"epoch {r['epoch']} done at step {r['step']}")
        elif "eval_loss" in r:
            self._write(f"eval at step {r['step']}: loss {r['eval_loss']:.4f} ({r.get('eval_samples')} samples)")
        elif ev is None and "loss" in r and self._bar is not None:
            self._bar.n = r["step"]
            self._bar.set_postfix(loss=f"{r['loss']:.4f}", tok_s=f"{r.get('tokens_per_s', 0):.0f}", refresh=False)
            self._bar.refresh()
