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
sys.path.insert(0, str(REPO))


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

    def stage_data():
        from mmrole.data.demo import build_demo

        if data.exists():
            shutil.rmtree(data)
        return build_demo(data)

    def stage_validate():
        run_cmd([py, "-m", "mmrole.cli", "data", "validate", str(data)])
        return {}

    def stage_prepare():
        run_cmd([py, "-m", "mmrole.cli", "data", "prepare", str(data), str(prepared)])
        return json.loads((prepared / "manifest.json").read_text())["counts"]

    stages = [("data", stage_data, data), ("validate", stage_validate, None), ("prepare", stage_prepare, prepared)]
    t_start = time.time()
    for i, (name, fn, path) in enumerate(stages, 1):
        st = Stage(name, out)
        if st.done:
            print(f"[{i}/{len(stages)}] {name}: already done (use --fresh to redo)", flush=True)
        else:
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
        print(f"  {k:10s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
