"""``mmrole eval ...``: ``report`` (tables, CSV/JSON, plots) and ``score`` (single-process API judging)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluation: judge scoring and reports")
    sub = p.add_subparsers(dest="eval_command", required=True)

    r = sub.add_parser(
        "report",
        help="per-model tables, CSV/JSON and plots over an eval/ folder",
        description="Aggregate <set>_reviews/<model>/<type>_test.json files under DIR.",
    )
    r.add_argument("dir", help="folder laid out like the published eval/ (any number of models)")
    r.add_argument("--json", action="store_true", help="print the report as JSON instead of Markdown")
    r.add_argument("--out", help="write summary CSVs, per-file results CSVs, report.json/.md and PNG plots here")
    r.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (0 = none)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--models", help="comma-separated subset of models")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--strict", action="store_true", help="fail on the first bad record instead of rejecting it")
    r.set_defaults(func=cmd_report)

    s = sub.add_parser(
        "score",
        help="score one model's answers with an OpenAI-compatible judge (no Ray)",
        description="Judge <set>_answers/<model>/*.json under DIR, resumably; writes "
        "<set>_reviews and <set>_results for the model when every score is in.",
    )
    s.add_argument("dir", help="eval folder holding <set>_answers/<model>/<type>_test.json")
    s.add_argument("--model", required=True, help="model folder name under <set>_answers/")
    s.add_argument("--judge-config", help="YAML with OpenAIJudgeConfig fields (flags below override it)")
    s.add_argument("--judge-model", help="model name at the endpoint")
    s.add_argument("--base-url", help="e.g. https://api.openai.com/v1 or http://host:8000/v1 (vLLM)")
    s.add_argument("--api-key-env", help="environment variable holding the API key (default OPENAI_API_KEY)")
    s.add_argument("--no-api-key", action="store_true", help="the endpoint takes no key")
    s.add_argument("--images-root", help="folder the records' image paths are relative to")
    s.add_argument("--judge-template", help="judge prompt YAML (default: packaged judge.yaml)")
    s.add_argument("--max-concurrency", type=int)
    s.add_argument("--metrics", help="comma-separated subset of the 8 metrics")
    s.add_argument("--batch-size", type=int, default=64, help="requests per store append")
    s.add_argument("--retry-failed", action="store_true", help="re-score keys whose stored result is a failure")
    s.add_argument(
        "--swap",
        action="store_true",
        help="position-bias run: show the answers swapped, store separately and compare with the normal run",
    )
    s.add_argument("--out", help="where to write judge_results/ and the reviews/results (default: DIR)")
    s.set_defaults(func=cmd_score)

    t = sub.add_parser(
        "import-template",
        help="convert the original MMRole judging script (eval/RM_review.py) into a judge template YAML",
        description="Read RM_review.py as data (parsed, never executed) and write the judge template it amounts "
        "to; with it the judge requests equal the original's byte for byte. --judge-template also takes the script.",
    )
    t.add_argument("script", help="path to RM_review.py (from a checkout of the MMRole repository)")
    t.add_argument("-o", "--out", required=True, help="template YAML to write")
    t.set_defaults(func=cmd_import_template)


def cmd_report(args) -> int:
    from .formats import EvalDataError
    from .report import build_report, render_markdown, write_report

    models = [m.strip() for m in args.models.split(",")] if args.models else None
    try:
        rep = build_report(args.dir, bootstrap=args.bootstrap, seed=args.seed, strict=args.strict, models=models)
    except EvalDataError as e:
        print(f"mmrole eval report: {e}", file=sys.stderr)
        return 2
    for st in rep.load_stats:
        if st.rejected or st.warnings:
            print(f"warning: {st.summary()}" + "".join(f"\n  {w}" for w in st.warnings), file=sys.stderr)
    print(json.dumps(rep.to_dict(), indent=2, ensure_ascii=False) if args.json else render_markdown(rep))
    if args.out:
        plots = not args.no_plots
        if plots and importlib.util.find_spec("matplotlib") is None:
            print(
                "warning: matplotlib is not installed (pip install 'mmrole[plots]'); writing no plots", file=sys.stderr
            )
            plots = False
        paths = write_report(rep, args.out, plots=plots)
        print(f"wrote {len(paths)} files under {args.out}", file=sys.stderr)
    return 0


def _judge_config(args):
    import yaml

    from .judges import OpenAIJudgeConfig

    d = {}
    if args.judge_config:
        d = yaml.safe_load(Path(args.judge_config).read_text(encoding="utf-8")) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{args.judge_config}: expected a mapping of OpenAIJudgeConfig fields")
    for flag, key in (
        ("judge_model", "model"),
        ("base_url", "base_url"),
        ("api_key_env", "api_key_env"),
        ("images_root", "images_root"),
        ("judge_template", "template_path"),
        ("max_concurrency", "max_concurrency"),
    ):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    if args.no_api_key:
        d["api_key_env"], d["require_api_key"] = None, False
    if "model" not in d:
        raise ValueError("no judge model: give --judge-model or 'model' in --judge-config")
    return OpenAIJudgeConfig.from_dict(d)


def cmd_score(args) -> int:
    from .aggregate import position_bias
    from .contract import expand_requests
    from .formats import EvalDataError
    from .judges import JudgeConfigError, OpenAIJudge
    from .metrics import check_metrics
    from .pipeline import load_answers_dir, score_requests, write_model_outputs
    from .store import store_for

    try:
        cfg = _judge_config(args)
        judge = OpenAIJudge(cfg)
        metrics = check_metrics([m.strip() for m in args.metrics.split(",")] if args.metrics else None)
        answers, stats = load_answers_dir(args.dir, args.model)
    except (ValueError, JudgeConfigError, EvalDataError) as e:
        print(f"mmrole eval score: {e}", file=sys.stderr)
        return 2
    for st in stats:
        print(st.summary(), file=sys.stderr)
    out = Path(args.out or args.dir)
    store = store_for(out, args.model, swapped=args.swap)
    requests = expand_requests(answers, metrics, swapped=args.swap)

    def progress(s):
        print(f"\r{s.n_already_done + s.n_scored}/{s.n_requests} scored, {s.n_failed} failed", end="", file=sys.stderr)

    try:
        summary = score_requests(requests, judge, store, args.batch_size, args.retry_failed, progress)
    except JudgeConfigError as e:
        print(f"\nmmrole eval score: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    audit = store.audit(r.key for r in requests)
    report = {"scoring": summary.to_dict(), "store": str(store.path), "audit": audit.to_dict()}
    rc = 0
    if not audit.complete:
        print(f"store incomplete ({len(audit.missing)} missing); rerun to resume", file=sys.stderr)
        rc = 1
    elif args.swap:  # compare with the normal run (keys scored in both)
        bias = position_bias(store_for(out, args.model).load(), store.load(), metrics)
        report["position_bias"] = {m: b.to_dict() for m, b in bias.items()}
    else:
        for p in write_model_outputs(out, args.model, answers, store.load(), metrics):
            print(f"wrote {p}", file=sys.stderr)
    print(json.dumps(report, indent=2))
    return rc


def cmd_import_template(args) -> int:
    from .original_judge import convert_original_script
    from .template import JudgeTemplate, JudgeTemplateError, dump_judge_template, load_judge_template

    try:
        text = Path(args.script).read_text(encoding="utf-8")
        template = JudgeTemplate.from_dict(convert_original_script(text, args.script), args.script)
    except (OSError, JudgeTemplateError) as e:
        print(f"mmrole eval import-template: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dump_judge_template(template), encoding="utf-8")
    if load_judge_template(out).to_dict() != template.to_dict():  # the YAML must load back to the same wording
        print(f"mmrole eval import-template: {out} does not load back identically", file=sys.stderr)
        return 1
    print(f"wrote {out} (from {args.script})", file=sys.stderr)
    return 0
