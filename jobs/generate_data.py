"""Build MMRole-style data for new characters and images with a teacher model, on Ray (embedded or a cluster).

    python jobs/generate_data.py --characters chars.yaml --images pics/ --out data/MyRoles [--config C] [k=v ...]
    ray job submit --working-dir . -- python jobs/generate_data.py --characters ... --images ... --out ...

The same run as ``mmrole data generate --ray``: the teacher stages run as Ray Data pipelines with bounded
concurrency; a rerun asks only for what is missing or changed. Exit 1 when a stage produced nothing usable.
"""

from __future__ import annotations

import argparse
import sys

from mmrole.config import ConfigError
from mmrole.datagen.cli import add_generate_arguments, run_generate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_arguments(ap)
    args = ap.parse_args(argv)
    args.ray = True
    try:
        return run_generate(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
