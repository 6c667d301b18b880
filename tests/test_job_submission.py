"""Job submission, for real: a local Ray head started with the ``ray start`` CLI (dashboard on, so the Jobs API
is served), a tiny ``jobs/train_agent.py`` run submitted through ``JobSubmissionClient`` with the repo as the
job's ``working_dir``, and the committed checkpoints + ``final_model`` checked in the (absolute) output dir.

Isolation: the head gets its own short temp dir (``/tmp/mmrole-rt-*``, socket paths must stay short), free ports
for everything that has a fixed default (GCS, dashboard, dashboard agent, Ray Client), and an environment with no
``RAY_*`` variables, so it neither joins nor disturbs any other Ray on the machine. It runs in the foreground
(``ray start --block``) as our child: teardown SIGTERMs that process (which stops every Ray process of this node)
and then SIGKILLs, by pid, anything of ours still alive; if the test process itself dies, the kernel SIGTERMs the
head (PR_SET_PDEATHSIG). ``ray stop`` is never used: it stops *every* Ray on the machine. The Jobs API is called
with a per-test token (``RAY_AUTH_MODE=token``), not with whatever ``~/.ray/auth_token`` holds.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from mmrole.ray_env import default_torch_extensions_dir

pytestmark = [pytest.mark.ray, pytest.mark.slow]
psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "submit-test"
TEST_TIMEOUT_S = 600
HEAD_START_TIMEOUT_S = 200  # `ray start` itself gives the dashboard RAY_DASHBOARD_STARTUP_TIMEOUT_S (set below)
AGENT_WAIT_S = 150  # for the node's dashboard agent to accept the submission
TEARDOWN_MARGIN_S = 75  # what the job may not use of the test's budget: stopping the head, the checks
# What the job's working_dir upload must leave out (the venv alone is ~2 GB; Ray's limit is ~500 MiB).
EXCLUDES = [
    ".venv",
    ".git",
    "demo_out",
    "runs",
    "outputs",
    "bench/results",
    "__pycache__",
    ".pytest_cache",
    "*.egg-info",
    "*.pyc",
    ".whl",
    ".gl",
]


def _ray_cli() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.is_file() else (shutil.which("ray") or pytest.skip("the `ray` CLI is not installed"))


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all sockets held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _term_with_parent() -> None:
    """preexec_fn: SIGTERM the child when this test process dies (even SIGKILLed), so that no head outlives it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"<{path}: {e}>"


def _ours(markers: list[str]) -> list:
    """Live processes of this user whose command line names one of our unique paths (the head's temp dir, the
    test's tmp dir): the Ray processes and job driver this test started, never anyone else's."""
    me = os.getuid()
    found = []
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if p.info["uids"] is None or p.info["uids"].real != me or p.pid == os.getpid():
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if any(m in cmd for m in markers):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _kill_all(procs: list, sig=signal.SIGKILL) -> None:
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(procs, timeout=10)


@contextmanager
def ray_head(log_dir: Path, extra_markers: list[str]):
    """A private Ray head (``ray start --head --block``) on 127.0.0.1; yields (dashboard_url, http_headers, markers)."""
    temp_dir = tempfile.mkdtemp(prefix="mmrole-rt-", dir="/tmp")  # short: Unix socket paths live under it
    markers = [temp_dir] + extra_markers
    gcs_port, dash_port, agent_port, client_port = _free_ports(4)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS & co.
    env.update(
        {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # SIGTERM: stop at once (no 30 s node drain)
            # Ray's default (60 s) for the dashboard to come up is not enough on a loaded 2-core box.
            "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "180",
            # Token auth with a token of our own. Left unset, Ray 2.60 turns token auth on by itself whenever
            # ~/.ray/auth_token exists (shared by every Ray of this user) and the Jobs API then answers 401 to a
            # client whose process has no RAY_AUTH_MODE. The driver and workers inherit both from the raylet.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
        }
    )
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={client_port}",
        "--num-cpus=4",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = log_dir / "ray_start.log"
    url = f"http://127.0.0.1:{dash_port}"
    head = None
    seen: dict[int, psutil.Process] = {}
    try:
        with open(log, "wb") as fh:
            head = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=log_dir,
                start_new_session=True,
                preexec_fn=_term_with_parent,
            )
        headers = {"authorization": f"Bearer {token}"}  # explicit: no process-global auth state in the client
        _wait_for_jobs_api(url, headers, head, log)
        yield url, headers, markers
    finally:
        if head is not None:
            # Remember every process of ours before stopping the head, to make sure afterwards that all are gone.
            try:
                seen.update({p.pid: p for p in psutil.Process(head.pid).children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
            seen.update({p.pid: p for p in _ours(markers)})
            if head.poll() is None:
                head.send_signal(signal.SIGTERM)  # `ray start --block` then kills all processes of its node
                try:
                    head.wait(timeout=45)
                except subprocess.TimeoutExpired:
                    head.kill()
                    head.wait(timeout=10)
            _kill_all(list(seen.values()) + _ours(markers))
        logs = Path(temp_dir) / "session_latest" / "logs"
        try:  # keep Ray's logs (~2 MB) with the test's tmp dir for post-mortems
            if logs.is_dir():
                shutil.copytree(
                    logs,
                    log_dir / "ray_logs",
                    dirs_exist_ok=True,
                    symlinks=True,
                    ignore_dangling_symlinks=True,
                    ignore=shutil.ignore_patterns("*.sock"),
                )
        except (OSError, shutil.Error):
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_jobs_api(url: str, headers: dict, head: subprocess.Popen, log: Path) -> None:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {head.returncode}:\n{_tail(log)}")
        if "Ray runtime started" not in _tail(log, 1 << 20):  # the Jobs API answers before the node is up
            time.sleep(1.0)
            continue
        try:
            JobSubmissionClient(url, headers=headers).list_jobs()
            return
        except AuthenticationError as e:  # will not get better by waiting
            pytest.fail(f"the Jobs API at {url} refused our token: {e}\n{_tail(log)}")
        except Exception as e:  # ConnectionError / HTTP 5xx while the dashboard modules start
            last = e
            time.sleep(1.0)
    pytest.fail(f"the Jobs API at {url} did not come up in {HEAD_START_TIMEOUT_S}s ({last!r}):\n{_tail(log)}")


def _submit(client, timeout_s: float = AGENT_WAIT_S, **kw) -> str:
    """``client.submit_job(**kw)``, retried while the node's dashboard agent is not registered yet: the Jobs API
    answers before the agent that runs job supervisors is up (HTTP 500 "No available agent to submit job, please
    try again later", after waiting 10 s itself), which takes a while on a loaded box."""
    deadline = time.monotonic() + timeout_s
    retried = False
    while True:
        try:
            return client.submit_job(**kw)
        except RuntimeError as e:
            if retried and "already exists" in str(e):  # an earlier try got through after all
                return client.get_job_info(kw["submission_id"]).submission_id
            transient = any(
                m in str(e) for m in ("No available agent", "not yet been persisted", "Server disconnected")
            )
            if not transient or time.monotonic() > deadline:
                raise
            retried = True
            time.sleep(2.0)


def _wait_for_job(client, job_id: str, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(2.0)
    return status


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_submit_train_agent_job_to_a_cli_started_head(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from safetensors.torch import load_file

    from mmrole.data.demo import build_demo
    from mmrole.data.prepare import prepare
    from mmrole.train import checkpoint as ckpt

    t_start = time.monotonic()
    tmp = tmp_path.resolve()
    build_demo(tmp / "MMRole_dataset", seed=0, rm_builder=None)
    prepared = tmp / "prepared"
    prepare(tmp / "MMRole_dataset", prepared)
    out, model = tmp / "runs", tmp / "tiny"  # absolute: the driver refuses relative paths under a submitted job

    overrides = [
        f"run_name={RUN_NAME}",
        f"output_dir={out}",
        f"data.prepared={prepared}",
        f"model.model_path={model}",
        "tiny_model=qwen2_5_vl",
        "data.max_rows=16",
        "data.prefetch_batches=4",
        "train.epochs=1",
        "train.global_batch_size=4",
        "train.micro_batch_size=2",
        "train.zero_stage=2",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5",
        "scaling.max_failures=0",
        "checkpoint.every_steps=2",
        "checkpoint.num_to_keep=2",
    ]
    entrypoint = shlex.join([sys.executable, "jobs/train_agent.py", "--config", "configs/smoke_cpu.yaml", *overrides])
    env_vars = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR")
        or default_torch_extensions_dir(),  # warm DeepSpeed op cache
        "DS_ACCELERATOR": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_V2_ENABLED": "1",
        "PYTHONUNBUFFERED": "1",
    }
    job_id = f"mmrole-submit-test-{uuid.uuid4().hex[:8]}"

    t0 = time.monotonic()
    with ray_head(tmp, extra_markers=[str(tmp)]) as (url, headers, markers):
        t_head = time.monotonic() - t0
        client = JobSubmissionClient(url, headers=headers)
        submitted = _submit(
            client,
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env_vars},
        )
        assert submitted == job_id
        status = _wait_for_job(client, job_id, TEST_TIMEOUT_S - TEARDOWN_MARGIN_S - (time.monotonic() - t_start))
        logs = client.get_job_logs(job_id)
        if status is None or not status.is_terminal():
            client.stop_job(job_id)
        assert status == JobStatus.SUCCEEDED, (
            f"job {job_id} is {status} after {time.monotonic() - t0:.0f}s (ray logs: {tmp / 'ray_logs'}); "
            f"message: {client.get_job_info(job_id).message}\n--- job logs (tail) ---\n{logs[-12000:]}"
        )
        t_job = time.monotonic() - t0 - t_head
        # The driver joined this cluster (RAY_ADDRESS from the job runtime), it did not start an embedded Ray.
        assert "Started a local Ray instance" not in logs, logs[-4000:]
        assert "[mmrole] done in" in logs, logs[-4000:]
    print(f"head up in {t_head:.1f}s, job {t_job:.1f}s, total with teardown {time.monotonic() - t0:.1f}s")
    left = _ours(markers)
    assert not left, f"Ray processes left running after teardown: {[(p.pid, p.cmdline()[:3]) for p in left]}"

    # The run lives in the absolute output dir (not in the job's working_dir copy).
    run = out / RUN_NAME
    summary = json.loads((run / "summary.json").read_text())
    # 16 rows, 2 workers x micro-batch 2, global batch 4 -> no accumulation, 4 optimizer steps in one epoch.
    assert summary["ok"] and summary["error"] is None and summary["final_step"] == 4, summary
    assert summary["counts"]["in"] == 16, summary

    entries = ckpt.scan(run)
    assert [(e.step, e.complete) for e in entries] == [(2, True), (4, True)], entries
    for e in entries:
        ok, why = ckpt.verify(e.path)
        assert ok, (e.path, why)
    assert ckpt.read_state(entries[-1].path)["world_size"] == 2
    assert not list(ckpt.checkpoints_root(run).glob(".tmp-*")), "partial checkpoint left behind"
    commits = sorted(run.glob("ray_commit-*"))
    assert len(commits) == 1 and json.loads((commits[0] / "commit.json").read_text())["step"] == 4

    final = run / "final_model"
    assert final.is_symlink() and final.resolve() == (entries[-1].path / ckpt.HF_DIR).resolve()
    assert json.loads((run / "final.json").read_text())["step"] == 4
    assert (final / "config.json").is_file()
    trained = load_file(str(final / "model.safetensors"))
    base = load_file(str(model / "model.safetensors"))  # created by the job's driver (tiny_model)
    assert trained.keys() == base.keys()
    assert any(not (trained[k] == base[k]).all() for k in base), "the weights did not change"
