"""The whole MMRole pipeline on the demo data, on an embedded local Ray (or a cluster if RAY_ADDRESS is set).

build data -> validate -> prepare -> train agent -> train reward model -> answer the test split -> score -> report

Re-runnable: finished stages are skipped (each writes a ``.done`` marker); ``--fresh`` starts clean.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Stage:
    def __init__(self, name: str, out: Path):
        self.name, self.marker = name, out / ".stages" / f"{name}.done"

    @property
    def done(self) -> bool:
        return self.marker.exists()

    def mark(self, info: dict) -> None:
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(json.dumps(info, ensure_ascii=False))


def run_cmd(cmd: list[str]) -> None:
    """Run a sub-step as its own process (as a user would), streaming its output."""
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    ap.add_argument("--fresh", action="store_true", help="delete previous outputs and start clean")
    ap.add_argument("--until", default=None, help="stop after this stage")
    args = ap.parse_args(argv)
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    data, prepared = out / "MMRole_dataset", out / "prepared"
    summary: dict = {}

    runs, models, evaldir = out / "runs", out / "models", out / "eval"
    agent_final, rm_final = runs / "demo-agent" / "final_model", runs / "demo-rm" / "final_model"
    ray_cpus = ["ray.num_cpus=4"]

    def stage_data():
        from mmrole.data.demo import build_demo
        from mmrole.train.rm_data import demo_rm_builder

        if data.exists():
            shutil.rmtree(data)
        return build_demo(data, rm_builder=demo_rm_builder)

    def stage_validate():
        run_cmd([py, "-m", "mmrole.cli", "data", "validate", str(data)])
        return {}

    def stage_prepare():
        run_cmd([py, "-m", "mmrole.cli", "data", "prepare", str(data), str(prepared)])
        return json.loads((prepared / "manifest.json").read_text())["counts"]

    def stage_train_agent():
        run_cmd(
            [
                py,
                "jobs/train_agent.py",
                "--config",
                "configs/smoke_cpu.yaml",
                "run_name=demo-agent",
                f"output_dir={runs}",
                f"data.prepared={prepared}",
                "data.max_rows=null",
                f"model.model_path={models / 'tiny-qwen2_5_vl'}",
                "train.epochs=1",
                "checkpoint.every_steps=20",
                *ray_cpus,
            ]
        )
        return {"final_model": str(agent_final)}

    def stage_train_rm():
        run_cmd(
            [
                py,
                "jobs/train_reward_model.py",
                "--config",
                "configs/smoke_cpu_rm.yaml",
                "run_name=demo-rm",
                f"output_dir={runs}",
                f"data.prepared={prepared}",
                "data.max_rows=null",
                f"model.model_path={models / 'tiny-qwen2_5_vl-rm'}",
                # enough steps for a tiny model to learn to end its reviews with the score pair
                "train.epochs=8",
                "train.global_batch_size=4",
                "train.lr=5e-3",
                "checkpoint.every_steps=96",
                *ray_cpus,
            ]
        )
        return {"final_model": str(rm_final)}

    pool = ["pool.concurrency=[2]", "pool.num_cpus=0.5", "pool.batch_size=8"]

    def stage_answer():
        run_cmd(
            [
                py,
                "jobs/generate_answers.py",
                "model_name=demo-agent",
                f"agent.model_path={agent_final}",
                f"data={prepared}",
                f"out={evaldir}",
                "generation.max_new_tokens=48",
                *pool,
            ]
        )
        return {}

    def stage_score():
        run_cmd(
            [
                py,
                "jobs/score_answers.py",
                f"eval_dir={evaldir}",
                "model_name=demo-agent",
                f"images_root={data / 'images'}",
                f"judge.model.model_path={rm_final}",
                "judge.model.max_length=2048",
                "judge.generation.max_new_tokens=64",
                "judge.max_retries=1",
                "bootstrap=200",
                *pool,
            ]
        )
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
    t_start = time.time()
    redone = False  # once a stage runs again, every later stage does too: its inputs changed
    for i, (name, fn, path) in enumerate(stages, 1):
        st = Stage(name, out)
        if st.done and not redone and (path is None or Path(path).exists()):
            print(f"[{i}/{len(stages)}] {name}: already done (use --fresh to redo)", flush=True)
        else:
            redone = True
            print(f"[{i}/{len(stages)}] {name} ...", flush=True)
            t0 = time.time()
            info = fn() or {}
            st.mark({"seconds": round(time.time() - t0, 1), **info})
            print(f"[{i}/{len(stages)}] {name} done in {time.time() - t0:.1f}s", flush=True)
        summary[name] = str(path) if path else "ok"
        if args.until == name:
            break
    print(f"\nfinished in {time.time() - t_start:.1f}s. Outputs:")
    for k, v in summary.items():
        print(f"  {k:18s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
