"""Quiet or verbose console for jobs: by default only our own progress lines reach the terminal; Ray, DeepSpeed and
transformers chatter (and every line Ray workers print) stays in Ray's log files. ``--verbose`` shows everything.
Reusable by any job (training, evaluation)."""

from __future__ import annotations

import logging
import os
import warnings

NOISY_LOGGERS = ("ray", "ray.train", "ray.data", "ray.serve", "deepspeed", "DeepSpeed", "transformers", "torch")


def setup_console(verbose: bool) -> bool:
    """Configure logging for a job's driver; returns ``log_to_driver`` for ``ray.init`` (worker output on the
    console only when verbose)."""
    if verbose:
        return True
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    return False
