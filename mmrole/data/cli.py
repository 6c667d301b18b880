"""``mmrole data validate|prepare|demo|lengths``."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _validate(args) -> int:
    from .validate import validate

    rep = validate(
        args.root, max_pixels=args.max_pixels, check_images=not args.skip_image_decode, template=args.template
    )
    if args.json:
        print(json.dumps(rep.to_json(), indent=2, ensure_ascii=False))
    else:
        c = rep.counts
        print(f"dataset: {rep.root}")
        print(
            f"characters: {c['characters']}  {c['characters_by_group_kind']}  languages {c['characters_by_language']}"
        )
        print(
            f"images: {c['images_referenced']} referenced, {c['images_checked']} decoded, "
            f"{c['images_missing_coco']} COCO missing"
        )
        print(f"dialogues: {c['dialogues_total']}  {c['dialogues']}")
        print(f"samples rendering yields: {c['samples_rendered']}  (not rendered: {c['samples_by_reason_rejected']})")
        print(f"test samples: {c['test_samples_total']}  {c['test_samples']}")
        for p in rep.problems:
            print(str(p))
        print(f"{len(rep.errors)} errors, {len(rep.warnings)} warnings")
    ok = rep.ok(strict=args.strict)
    if not ok and not args.json:
        print(
            "dataset NOT usable" + (" (--strict: warnings count)" if args.strict and not rep.errors else ""),
            file=sys.stderr,
        )
    return 0 if ok else 1


def _prepare(args) -> int:
    from .prepare import PrepareConfig, prepare

    cfg = PrepareConfig(
        shard_rows=args.shard_rows,
        embed_images=args.embed_images,
        require_images=not args.allow_missing_images,
        hold_out_test_dialogues=not args.keep_test_dialogues,
        template=args.template,
        test_wording=args.test_wording,
        train_source=args.train_source,
    )
    t0 = time.time()
    m = prepare(args.root, args.out, cfg, progress=lambda s: print(s, file=sys.stderr))
    dt = time.time() - t0
    for name, counts in m["counts"].items():
        print(
            f"{name}: in {counts['in']}, out {counts['out']}, rejected {counts['rejected']} "
            f"{counts['rejected_by_reason'] or ''}".rstrip()
        )
    r = m["render"]
    print(
        f"render: dialogues in {r['dialogues_in']}, rendered {r['dialogues_rendered']}, rejected "
        f"{r['dialogues_rejected']}, held out for test {r['dialogues_held_out_for_test']}; "
        f"{r['samples_rendered']} samples {r['rejected_by_reason'] or ''}".rstrip()
    )
    print(f"wrote {args.out} in {dt:.1f}s (manifest.json, rejects.jsonl)")
    return 0


def _demo(args) -> int:
    from .demo import build_demo

    counts = build_demo(args.out, seed=args.seed)
    print(json.dumps(counts, ensure_ascii=False))
    return 0


# ---- mmrole data generate | import-card | export-card (bring your own characters; mmrole/datagen) ----------------


def _generate(args) -> int:
    from mmrole.config import ConfigError

    from ..datagen.cli import run_generate

    try:
        return run_generate(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def _import_card(args) -> int:
    from ..datagen.cli import run_import_card

    return run_import_card(args)


def _export_card(args) -> int:
    from ..datagen.cli import run_export_card

    return run_export_card(args)


def register_datagen(dsub) -> None:
    from ..datagen.cli import add_card_arguments, add_generate_arguments

    g = dsub.add_parser("generate", help="build MMRole-style data for new characters and images with a teacher model")
    add_generate_arguments(g)
    g.set_defaults(func=_generate)
    ic = dsub.add_parser("import-card", help="Character Card V2 (JSON or PNG) -> an MMRole profile under ROOT")
    ec = dsub.add_parser("export-card", help="an MMRole character -> a Character Card V2 (JSON or PNG)")
    add_card_arguments(ic, ec)
    ic.set_defaults(func=_import_card)
    ec.set_defaults(func=_export_card)


def _lengths(args) -> int:
    from mmrole.models.config import VLMConfig
    from mmrole.train.lengths import DEFAULT_MAX_LENGTHS, format_length_report, measure_lengths

    from .prepared import PreparedDataError

    cfg = VLMConfig(model_path=args.model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    try:
        rep = measure_lengths(args.prepared, cfg, split=args.split, limit=args.limit)
    except PreparedDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    max_lengths = args.max_length or list(DEFAULT_MAX_LENGTHS)
    if args.json:
        print(json.dumps(rep.to_json(max_lengths), indent=2, ensure_ascii=False))
    else:
        print(format_length_report(rep, max_lengths))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="dataset tools: validate, prepare, demo, generate, import-card, export-card, lengths"
    )
    dsub = p.add_subparsers(dest="data_command", required=True)

    v = dsub.add_parser("validate", help="check a published-layout MMRole dataset root")
    v.add_argument("root")
    v.add_argument("--strict", action="store_true", help="fail on warnings too (e.g. missing COCO images)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--max-pixels", type=int, default=64_000_000)
    v.add_argument("--skip-image-decode", action="store_true", help="check existence only (faster)")
    v.add_argument("--template", default=None, help="role-play template YAML (default: packaged)")
    v.set_defaults(func=_validate)

    pr = dsub.add_parser("prepare", help="render samples into Parquet shards with a manifest")
    pr.add_argument("root")
    pr.add_argument("out")
    pr.add_argument("--shard-rows", type=int, default=20_000)
    pr.add_argument("--embed-images", action="store_true", help="store image bytes in the shards")
    pr.add_argument(
        "--allow-missing-images",
        action="store_true",
        help="keep samples whose image file is absent (default: reject them)",
    )
    pr.add_argument(
        "--keep-test-dialogues", action="store_true", help="do not hold the test split's dialogues out of training"
    )
    pr.add_argument("--template", default=None, help="role-play template YAML (default: packaged)")
    pr.add_argument(
        "--test-wording",
        choices=("template", "published"),
        default="template",
        help="template: re-render the test questions with the training template (one wording, the default); "
        "published: keep the published test questions as they are",
    )
    pr.add_argument(
        "--train-source",
        choices=("dialogues", "published"),
        default="dialogues",
        help="dialogues: render training samples from the dialogues; published: read data/train/*.json as it is "
        "(the published wording for training and test, what the released MMRole checkpoints saw)",
    )
    pr.set_defaults(func=_prepare)

    d = dsub.add_parser("demo", help="write the small self-made demo dataset")
    d.add_argument("out")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)

    register_datagen(dsub)
    ln = dsub.add_parser(
        "lengths", help="token-length distribution of a prepared split for a model, and what a max_length keeps"
    )
    ln.add_argument("prepared", help="output folder of `mmrole data prepare`")
    ln.add_argument("--model", required=True, help="model (or adapter) folder whose processor encodes the rows")
    ln.add_argument("--split", default="train")
    ln.add_argument(
        "--max-length",
        type=int,
        action="append",
        help="report what this max_length keeps (repeatable; default 1024, 2048, 4096, 8192)",
    )
    ln.add_argument("--limit", type=int, default=None, help="measure only the first N rows")
    ln.add_argument("--min-pixels", type=int, default=None, help="image budget, as model.min_pixels in training")
    ln.add_argument("--max-pixels", type=int, default=None, help="image budget, as model.max_pixels in training")
    ln.add_argument("--json", action="store_true", help="print the report as JSON")
    ln.set_defaults(func=_lengths)
