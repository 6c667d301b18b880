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

import json
import sys
from dataclasses import asdict

from mmrole.config_cli import job_config_from_argv
from mmrole.eval.job_config import GenerateJobConfig


def main(argv=None) -> int:
    cfg, exit_code = job_config_from_argv(GenerateJobConfig, argv, __doc__, "pool.batch_size=16")
    if cfg is None:
        return exit_code
    print("resolved config:\n" + json.dumps(asdict(cfg), indent=2), flush=True)
    from mmrole.ray_env import init_ray
    from mmrole.ray_eval import run_generate

    # Ray starts only when there is work: a fully answered / scored run says so in a second.
    run_generate(cfg, start_ray=lambda: init_ray(cfg.ray_address))
    return 0


if __name__ == "__main__":
    sys.exit(main())
