"""Is a run already finished? Checked on the driver from the run directory alone (no Ray, no torch), so re-running
a completed command answers in well under a second instead of starting a cluster and workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .config import TrainJobConfig


def finished_run(cfg: TrainJobConfig) -> Optional[dict]:
    """The run's ``summary.json`` when the run finished ok with this very config and its final model is still
    there; None when there is anything left to do."""
    run = cfg.run_dir
    try:
        summary = json.loads((run / "summary.json").read_text())
        final = json.loads((run / "final.json").read_text())
        same_config = (run / "config.yaml").read_text() == cfg.to_yaml()
    except (OSError, ValueError):
        return None
    if not (summary.get("ok") and same_config and Path(final.get("hf_model", "")).is_dir()):
        return None
    if summary.get("final_step") != final.get("step"):
        return None
    return summary
