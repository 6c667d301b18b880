"""The whole MMRole pipeline on the demo data, on an embedded local Ray (or a cluster if RAY_ADDRESS is set).

build data -> validate -> prepare -> train agent -> train reward model -> answer the test split -> score -> report

Every stage runs in this process, on one Ray session (started by the first stage that needs it), through the same
entry points a user would call; each stage prints that command. Settings: configs/demo/*.yaml. Re-runnable:
finished stages are skipped (each writes a ``.done`` marker); ``--fresh`` starts clean. At the end a table gives
each stage's seconds (``--timings FILE`` also writes them as JSON, for bench/bench_demo.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "demo"


class Stage:
    def __init__(self, name: str, out: Path):
        self.name, self.marker = name, out / ".stages" / f"{name}.done"

    @property
    def done(self) -> bool:
        return self.marker.exists()

    def mark(self, info: dict) -> None:
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(json.dumps(info, ensure_ascii=False))


def _job_main(script: str):
    """``main`` of ``jobs/<script>`` (the jobs folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_demo_job_{Path(script).stem}", REPO / "jobs" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(name: str, shown: list[str], call) -> None:
    """Run one entry point in this process; a non-zero exit stops the demo, naming the stage and the command."""
    print("$ " + " ".join(shown), flush=True)
    rc = call()
    if rc:
        raise SystemExit(f"demo stage {name} failed (exit {rc}): {' '.join(shown)}")


def prepare_env() -> None:
    """Environment the Ray workers inherit (set before Ray starts): offline, a persistent DeepSpeed op cache per
    venv, the CPU accelerator without a GPU, Ray Train V2."""
    from mmrole.ray_env import default_torch_extensions_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_torch_extensions_dir())
    if not shutil.which("nvidia-smi"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    ap.add_argument("--fresh", action="store_true", help="delete previous outputs and start clean")
    ap.add_argument("--until", default=None, help="stop after this stage")
    ap.add_argument("--timings", default=None, help="also write the per-stage seconds to this JSON file")
    ap.add_argument("--verbose", action="store_true", help="show Ray, DeepSpeed and worker output")
    for flag, what in (
        ("agent", "agent.yaml"),
        ("reward-model", "reward_model.yaml"),
        ("answer", "generate.yaml"),
        ("score", "score.yaml"),
    ):
        ap.add_argument(
            f"--{flag}",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help=f"override a key of configs/demo/{what} (repeatable), e.g. --agent train.max_steps=4",
        )
    args = ap.parse_args(argv)
    t_start = time.time()
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_env()
    data, prepared = out / "MMRole_dataset", out / "prepared"
    runs, models, evaldir = out / "runs", out / "models", out / "eval"
    agent_final, rm_final = runs / "demo-agent" / "final_model", runs / "demo-rm" / "final_model"
    timings: dict = {}

    def ray_session() -> None:
        """One Ray for every stage: started once, by the first stage that needs it (each job's own start-up then
        finds it running)."""
        import ray

        if ray.is_initialized():
            return
        from mmrole.console import setup_console
        from mmrole.ray_env import init_ray

        t0 = time.time()
        log_to_driver = setup_console(args.verbose)
        init_ray(num_cpus=4, log_to_driver=log_to_driver)
        timings["ray_start"] = round(time.time() - t0, 1)
        print(f"[demo] Ray started in {timings['ray_start']:.1f}s (one session for every stage)", flush=True)

    def stage_data():
        from mmrole.data.demo import build_demo
        from mmrole.train.rm_data import demo_rm_builder

        if data.exists():
            shutil.rmtree(data)
        return build_demo(data, rm_builder=demo_rm_builder)

    def mmrole_cli(name, *cli_args):
        from mmrole.cli import main as cli_main

        _run(name, ["mmrole", *cli_args], lambda: cli_main(list(cli_args)))

    def stage_validate():
        mmrole_cli("validate", "data", "validate", str(data))
        return {}

    def stage_prepare():
        mmrole_cli("prepare", "data", "prepare", str(data), str(prepared))
        return json.loads((prepared / "manifest.json").read_text())["counts"]

    def train(name: str, kind: str, config: str, run_name: str, model_dir: str) -> None:
        from mmrole.train.cli import main as train_main

        argv = [
            "--config",
            str(CONFIGS / config),
            f"run_name={run_name}",
            f"output_dir={runs}",
            f"data.prepared={prepared}",
            f"model.model_path={models / model_dir}",
            *(["--verbose"] if args.verbose else []),
            *(args.agent if kind == "agent" else args.reward_model),
        ]
        ray_session()
        script = "jobs/train_agent.py" if kind == "agent" else "jobs/train_reward_model.py"
        _run(name, ["python", script, *argv], lambda: train_main(argv, kind=kind))

    def stage_train_agent():
        train("train_agent", "agent", "agent.yaml", "demo-agent", "tiny-qwen2_5_vl")
        return {"final_model": str(agent_final)}

    def stage_train_rm():
        train("train_reward_model", "reward_model", "reward_model.yaml", "demo-rm", "tiny-qwen2_5_vl-rm")
        return {"final_model": str(rm_final)}

    def stage_answer():
        argv = [
            "--config",
            str(CONFIGS / "generate.yaml"),
            f"agent.model_path={agent_final}",
            f"data={prepared}",
            f"out={evaldir}",
            *args.answer,
        ]
        # no ray_session() here: the job starts Ray only when something is left to answer (after the training
        # stages it is already up)
        _run("answer", ["python", "jobs/generate_answers.py", *argv], lambda: _job_main("generate_answers.py")(argv))
        return {}

    def stage_score():
        argv = [
            "--config",
            str(CONFIGS / "score.yaml"),
            f"eval_dir={evaldir}",
            f"images_root={data / 'images'}",
            f"judge.model.model_path={rm_final}",
            *args.score,
        ]
        _run("score", ["python", "jobs/score_answers.py", *argv], lambda: _job_main("score_answers.py")(argv))
        return {"report": str(evaldir / "report")}

    stages = [
        ("data", stage_data, data),
        ("validate", stage_validate, None),
        ("prepare", stage_prepare, prepared),
        ("train_agent", stage_train_agent, agent_final),
        ("train_reward_model", stage_train_rm, rm_final),
        ("answer", stage_answer, evaldir),
        ("score", stage_score, evaldir / "report" / "report.md"),
    ]
    summary: dict = {}
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    redone = False  # once a stage runs again, every later stage does too: its inputs changed
    try:
        for i, (name, fn, path) in enumerate(stages, 1):
            st = Stage(name, out)
            if st.done and not redone and (path is None or Path(path).exists()):
                print(f"[{i}/{len(stages)}] {name}: already done (use --fresh to redo)", flush=True)
                timings[name] = None
            else:
                redone = True
                print(f"[{i}/{len(stages)}] {name} ...", flush=True)
                t0 = time.time()
                info = fn() or {}
                timings[name] = round(time.time() - t0, 1)
                st.mark({"seconds": timings[name], **info})
                print(f"[{i}/{len(stages)}] {name} done in {time.time() - t0:.1f}s", flush=True)
            summary[name] = str(path) if path else "ok"
            if args.until == name:
                break
    finally:
        # A Ray this demo started (here or in a job); a caller's own session (tests) stays up.
        if "ray" in sys.modules and sys.modules["ray"].is_initialized() and not ray_was_up:
            sys.modules["ray"].shutdown()
    timings["total"] = round(time.time() - t_start, 1)
    print(f"\nfinished in {timings['total']:.1f}s. Seconds per stage (-: skipped, done before):")
    for k, v in timings.items():
        print(f"  {k:18s} {'-' if v is None else f'{v:.1f}'}")
    print("Outputs:")
    for k, v in summary.items():
        print(f"  {k:18s} {v}")
    report = evaldir / "report" / "report.md"
    if "score" in summary and report.is_file():
        overall = "\n\n".join(report.read_text(encoding="utf-8").split("\n\n")[:2])
        print(f"\nReport: {report}\n{overall}", flush=True)
    if args.timings:
        Path(args.timings).write_text(json.dumps(timings, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
