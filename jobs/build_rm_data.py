#!/usr/bin/env python
"""Build reward-model training data (published RM_data format) from judge reviews.

    python jobs/build_rm_data.py --reviews /work/shared/mmrole-sample/eval --out DATASET_ROOT [--test-fraction 0.1]
    python jobs/build_rm_data.py --demo demo_out/MMRole_dataset      # synthetic reviews of the demo test split

Writes DATASET_ROOT/RM_data/train/rm_train.json (+ test/rm_test.json), RM_data/rejects.jsonl and
RM_data/build_report.json; then `mmrole data prepare DATASET_ROOT OUT` turns them into the rm_train/rm_test splits
that jobs/train_reward_model.py reads. The judge-prompt wording is mmrole.eval's template (--judge-template or
$MMROLE_JUDGE_TEMPLATE to use another).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--reviews",
        action="append",
        default=[],
        help="a reviews file or a folder searched for <set>_reviews/<model>/<type>_test.json (repeatable)",
    )
    ap.add_argument("--out", help="dataset root to write RM_data/ into")
    ap.add_argument(
        "--demo",
        metavar="DATASET_ROOT",
        help="make synthetic reviews for this (demo) dataset's test split and build RM_data from them",
    )
    ap.add_argument("--test-fraction", type=float, default=0.1, help="share of samples (by id) held out as rm_test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--judge-template",
        default=None,
        help="judge template YAML, or the original RM_review.py for the wording the published reviews were written "
        "for (default: packaged)",
    )
    ap.add_argument("--metrics", nargs="*", default=None, help="only these metrics (default: all 8)")
    args = ap.parse_args(argv)

    from mmrole.train.rm_data import build_rm_data, demo_rm_builder, find_review_files

    if args.demo:
        print(json.dumps(demo_rm_builder(args.demo, seed=args.seed)))
        return 0
    if not args.reviews or not args.out:
        ap.error("--reviews and --out are required (or --demo DATASET_ROOT)")
    template = None
    if args.judge_template:
        from mmrole.eval.template_loader import load_judge_template

        template = load_judge_template(args.judge_template)
    files = [f for r in args.reviews for f in find_review_files(r)]
    if not files:
        print(f"no review files found under {args.reviews}", file=sys.stderr)
        return 1
    stats = build_rm_data(
        files, args.out, test_fraction=args.test_fraction, seed=args.seed, template=template, metrics=args.metrics
    )
    d = stats.to_dict()
    print(
        f"{d['files']} review files, {d['records_in']} records: in {d['in']} (record, metric) pairs, out {d['out']} "
        f"(train {d['out_train']}, test {d['out_test']}), rejected {d['rejected']} {d['rejected_by_reason'] or ''}".rstrip()
    )
    print(f"wrote {Path(args.out) / 'RM_data'} (rejects.jsonl, build_report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
