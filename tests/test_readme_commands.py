"""Every command the docs mark as runnable works verbatim, from a fresh-clone-like copy, on the demo data.

Marker convention:

- Markdown (README.md, cluster/README.md): an HTML comment ``<!-- test: run -->`` on the line before a fenced
  ``bash`` block marks the whole block. A block is run as one bash script (``set -e``), so exports and
  ``eval "$(scripts/local_head.sh start)"`` carry to its later lines. Unmarked blocks say why in a comment
  (placeholders, GPUs, a cloud account).
- Config headers (configs/**/*.yaml): a comment line ``# test: run`` marks the ``#   <command>`` lines right after
  it (three spaces after the ``#``) as one block.

Blocks run in this order, in one copy of the repository (tracked and untracked-but-not-ignored files, as a clone
would have them), so they share one demo dataset, one prepared folder and one tiny model: README.md, the config
headers (sorted), cluster/README.md. A block whose commands all ran before (same text) is not run again.
Nothing is substituted.
The environment is the test suite's (offline Hugging Face, the venv's ``bin`` first on PATH, the copy on
PYTHONPATH, no ``RAY_*`` variables) plus free ports for ``scripts/local_head.sh``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # ray_processes, under any pytest import mode
MD_MARK = "<!-- test: run -->"
YAML_MARK = "# test: run"
DOCS = ["README.md", "cluster/README.md"]
BLOCK_TIMEOUT_S = 900  # a loaded 2-core box; about 2 minutes per block when idle


def join_continuations(lines: list[str]) -> list[str]:
    out, cur = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1].rstrip() + " "
            continue
        out.append((cur + line.strip()).strip())
        cur = ""
    if cur:
        out.append(cur.strip())
    return [c for c in out if c and not c.startswith("#")]


def markdown_blocks(path: Path) -> list[list[str]]:
    """The command lines of each marked ``bash`` block of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == MD_MARK:
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j >= len(lines) or not lines[j].strip().startswith("```bash"):
                raise AssertionError(f"{path}:{i + 1}: {MD_MARK} must come right before a ```bash block")
            k = j + 1
            while k < len(lines) and not lines[k].strip().startswith("```"):
                k += 1
            blocks.append(join_continuations(lines[j + 1 : k]))
            i = k
        i += 1
    return blocks


def yaml_header_blocks(path: Path) -> list[list[str]]:
    """The ``#   <command>`` lines after each ``# test: run`` line of a config's header."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() == YAML_MARK:
            cmds = []
            for nxt in lines[i + 1 :]:
                if not nxt.startswith("#   "):
                    break
                cmds.append(nxt[4:])
            blocks.append(join_continuations(cmds))
    return blocks


def marked_blocks(root: Path = REPO) -> list[tuple[str, list[str]]]:
    """(source, commands) of every marked block, in the order they run."""
    found = [("README.md", b) for b in markdown_blocks(root / "README.md")]
    for cfg in sorted((root / "configs").rglob("*.yaml")):
        found += [(str(cfg.relative_to(root)), b) for b in yaml_header_blocks(cfg)]
    found += [("cluster/README.md", b) for b in markdown_blocks(root / "cluster" / "README.md")]
    return found


# ------------------------------------------------------------------------------------------------ fast checks


def test_marked_blocks_are_found_and_hold_no_placeholders():
    blocks = marked_blocks()
    sources = {s for s, _ in blocks}
    assert {"README.md", "cluster/README.md", "configs/smoke_cpu.yaml"} <= sources, sources
    commands = [c for _, b in blocks for c in b]
    assert "python jobs/train_agent.py --config configs/smoke_cpu.yaml" in commands
    assert any(c.startswith("ray job submit") and "configs/smoke_cpu.yaml" in c for c in commands), commands
    for source, block in blocks:
        assert block, f"{source}: an empty marked block"
        for c in block:
            # placeholders are for people; a marked command must run as written
            code = code_of(c)  # trailing comments may say anything
            assert not re.search(r"\[key=value|\bDATASET_ROOT\b|<[a-z ]+>|\.\.\.", code), f"{source}: {c}"


def test_markers_are_not_dangling(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text(f"{MD_MARK}\n\ntext\n")
    with pytest.raises(AssertionError, match="must come right before"):
        markdown_blocks(bad)
    ok = tmp_path / "ok.md"
    ok.write_text(f"{MD_MARK}\n```bash\na \\\n  --b   # x\n# comment\nc\n```\n```bash\nnot marked\n```\n")
    assert markdown_blocks(ok) == [["a --b   # x", "c"]]
    assert code_of("mmrole data demo out   # a comment") == code_of("mmrole data demo out") == "mmrole data demo out"


# ------------------------------------------------------------------------------------------------ running them


def code_of(command: str) -> str:
    """A command without its trailing comment (two commands that differ only there are the same)."""
    return command.split(" #")[0].strip()


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a clone would have them (tracked + untracked-but-not-ignored, working tree)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = raw.decode()
        src = REPO / rel
        if not src.is_file():  # deleted in the working tree
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    return dest


def command_env(clone: Path, head_dir: Path) -> dict:
    from ray_processes import free_ports

    gcs, dash, agent, client = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MMROLE_"))}
    env.update(
        {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            "PYTHONPATH": str(clone),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DS_ACCELERATOR": "cpu",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_USAGE_STATS_ENABLED": "0",
            "MMROLE_HEAD_DIR": str(head_dir),
            "MMROLE_HEAD_PORT": str(gcs),
            "MMROLE_DASHBOARD_PORT": str(dash),
            "MMROLE_AGENT_PORT": str(agent),
            "MMROLE_CLIENT_PORT": str(client),
        }
    )
    return env


def run_block(script: str, cwd: Path, env: dict, timeout_s: float) -> tuple[int, str]:
    """Run a block as one bash script in its own process group; on timeout the whole group is killed (a job
    left running would hold its Ray instance)."""
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            time.sleep(5)
        out, _ = proc.communicate()
        return -1, f"{out}\n<timed out after {timeout_s}s>"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_marked_commands_run_verbatim(tmp_path):
    from ray_processes import kill_all, ours

    clone = fresh_copy(tmp_path / "mmrole")
    head_dir = Path(tempfile.mkdtemp(prefix="mmrole-hd-", dir="/tmp"))  # short: Ray socket paths live under it
    env = command_env(clone, head_dir)
    done: set[str] = set()
    timings, outputs = [], {}
    try:
        for source, block in marked_blocks(clone):
            if all(code_of(c) in done for c in block):  # a block is one shell: all of it, or none if all ran
                continue
            todo = block
            script = "set -eo pipefail\n" + "\n".join(f"echo '$ '{shlex.quote(c)}\n{c}" for c in todo)
            t0 = time.monotonic()
            rc, output = run_block(script, clone, env, BLOCK_TIMEOUT_S)
            timings.append((source, todo[0][:60], time.monotonic() - t0))
            assert rc == 0, f"{source}: block failed (exit {rc}):\n{output[-8000:]}"
            done.update(code_of(c) for c in todo)
            outputs.update({code_of(c): output for c in todo})
        # the smoke run the docs promise, embedded ...
        assert (clone / "runs" / "smoke-agent" / "final_model" / "config.json").is_file()
        # ... and submitted as a job to the CLI-started head
        submit = next(c for c in outputs if c.startswith("ray job submit") and "run_name=submitted-agent" in c)
        check_submitted_run(
            clone / "runs" / "submitted-agent", clone / "runs" / "_models" / "tiny-qwen2_5_vl", outputs[submit]
        )
    finally:
        subprocess.run(["bash", "scripts/local_head.sh", "stop"], cwd=clone, env=env, timeout=120)
        deadline = time.monotonic() + 30  # the node's processes exit shortly after the head's
        while (left := ours([str(head_dir)])) and time.monotonic() < deadline:
            time.sleep(1)
        kill_all(left)
        shutil.rmtree(head_dir, ignore_errors=True)
        print("\n".join(f"{t:6.1f}s  {s}: {c}" for s, c, t in timings))
    assert not left, (
        f"Ray processes left running after `local_head.sh stop`: {[(p.pid, p.cmdline()[:3]) for p in left]}"
    )


def check_submitted_run(run: Path, base_model: Path, output: str) -> None:
    """The README's `ray job submit` training: the driver joined the head (no embedded Ray), 32 rows in 2 workers x
    micro-batch 2 x global batch 8 gave 4 steps; checkpoints 2 and 4 committed and verified, no partial one left,
    Ray holds one commit record (the newest), final_model links to step 4 and its weights moved."""
    import json

    from safetensors.torch import load_file

    from mmrole.train import checkpoint as ckpt

    assert "Started a local Ray instance" not in output, output[-4000:]
    assert "[mmrole] done in" in output, output[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ok"] and summary["error"] is None and summary["final_step"] == 4, summary
    assert summary["counts"]["in"] == 32, summary
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
    trained = load_file(str(final / "model.safetensors"))
    base = load_file(str(base_model / "model.safetensors"))
    assert trained.keys() == base.keys()
    assert any(not (trained[k] == base[k]).all() for k in base), "the weights did not change"
