"""Answer a test split with an agent: Ray Data batch inference over a pool of model replicas.

    python jobs/generate_answers.py --config configs/eval/generate_tiny_cpu.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/generate_answers.py --config CONFIG [key=value ...]

Writes ``<out>/<set>_answers/<model_name>/<type>_test.json`` (published format) and keeps an append-only store
``<out>/answer_store/<model_name>.jsonl`` keyed by agent, generation parameters and rendered sample: a rerun answers
only what this agent has not answered (``retry_failed=true`` also redoes failures). ``agent.kind: openai`` answers
with an OpenAI-compatible endpoint (``agent.openai.base_url``, ``agent.openai.model``, key from
``agent.openai.api_key_env``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrole.eval.job_config import GenerateJobConfig, load_job_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML config")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. pool.batch_size=16")
    args = ap.parse_args(argv)
    cfg = load_job_config(GenerateJobConfig, args.config, args.overrides)
    print("resolved config:\n" + json.dumps(asdict(cfg), indent=2), flush=True)
    from mmrole.ray_env import init_ray
    from mmrole.ray_eval import run_generate

    # Ray starts only when there is work: a fully answered / scored run says so in a second.
    run_generate(cfg, start_ray=lambda: init_ray(cfg.ray_address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
