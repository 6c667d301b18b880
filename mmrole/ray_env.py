"""Starting or joining Ray for a job: a cluster when an address is given (``ray job submit`` sets one),
otherwise an embedded local Ray sized for this machine. Ray glue: imports ray lazily."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def default_torch_extensions_dir() -> str:
    """A persistent DeepSpeed op-build cache per Python environment.

    DeepSpeed's JIT build files hold the venv's absolute include paths, so two venvs sharing one cache rebuild
    (30-130 s) every time they alternate."""
    import hashlib
    import sys

    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return str(Path("~/.cache/mmrole/torch_extensions").expanduser() / tag)


def project_env_vars() -> dict:
    """Environment that Ray workers need to import this project and stay offline-safe."""
    env = {
        k: os.environ[k]
        for k in (
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "TORCH_EXTENSIONS_DIR",
            "DS_ACCELERATOR",
            "MMROLE_API_TOKEN",
        )
        if k in os.environ
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def init_ray(
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    log_to_driver: bool = True,
    ignore_reinit_error: bool = True,
):
    """Connect to ``address`` / $RAY_ADDRESS, else start a local Ray on 127.0.0.1.

    Locally, logical CPUs are at least 4: on a 2-core laptop, actors that hold every logical CPU starve
    Ray Data's read tasks and a job hangs silently; oversubscribing logical CPUs keeps reads schedulable.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # Driver of a `ray job submit`: the job's runtime env (--working-dir) already ships the project.
        ray.init(address=address, log_to_driver=log_to_driver, ignore_reinit_error=ignore_reinit_error)
    elif address:
        # A driver outside the cluster: ship the project as the working dir.
        env = {k: v for k, v in project_env_vars().items() if k != "PYTHONPATH"}
        ray.init(
            address=address,
            log_to_driver=log_to_driver,
            ignore_reinit_error=ignore_reinit_error,
            runtime_env={
                "working_dir": str(REPO),
                "env_vars": env,
                "excludes": [".venv/", "demo_out/", "runs/", "outputs/", ".git/"],
            },
        )
    else:
        cpus = num_cpus or max(4, os.cpu_count() or 1)
        # address="local": never attach to a `ray start` cluster that happens to run on this machine.
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=log_to_driver,
            runtime_env={"env_vars": project_env_vars()},
            ignore_reinit_error=ignore_reinit_error,
            _node_ip_address="127.0.0.1",
        )
    return ray
