"""Answer a test split with an agent: Ray Data batch inference over a pool of model replicas.

    python jobs/generate_answers.py --config configs/eval/generate_tiny_cpu.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/generate_answers.py --config CONFIG [key=value ...]

Writes ``<out>/<set>_answers/<model_name>/<type>_test.json`` (published format) and keeps an append-only store
``<out>/answer_store/<model_name>.jsonl``: a rerun answers only the ids it lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from mmrole.config import ConfigError, config_error_message, config_to_yaml, resolve_paths
from mmrole.eval.job_config import GenerateJobConfig, load_job_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config")
    ap.add_argument(
        "--print-config", action="store_true", help="print the resolved config (paths made absolute) and exit"
    )
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. pool.batch_size=16")
    args = ap.parse_args(argv)
    try:  # relative paths become absolute here, on the driver: the replicas run elsewhere
        cfg = resolve_paths(load_job_config(GenerateJobConfig, args.config, args.overrides))
    except ConfigError as e:
        print(config_error_message(e), file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    print("resolved config:\n" + json.dumps(asdict(cfg), indent=2), flush=True)
    from mmrole.ray_env import init_ray
    from mmrole.ray_eval import run_generate

    init_ray(cfg.ray_address)
    run_generate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
