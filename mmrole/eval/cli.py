"""``mmrole eval ...``: ``report``, ``score`` (single-process API judging), ``prompts`` (dry run), ``agreement``,
``import-template``, ``converse`` (whole conversations with a partner, judged per turn and as a whole)."""

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
    r.add_argument("--radar-models", help="comma-separated models drawn on the radar (default: all in the report)")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--strict", action="store_true", help="fail on the first bad record instead of rejecting it")
    r.set_defaults(func=cmd_report)

    s = sub.add_parser(
        "score",
        help="score models' answers with an OpenAI-compatible judge (no Ray)",
        description="Judge <set>_answers/<model>/*.json under DIR, resumably; writes "
        "<set>_reviews and <set>_results for the model when every score is in.",
    )
    s.add_argument("dir", help="eval folder holding <set>_answers/<model>/<type>_test.json")
    s.add_argument("--model", help="model folder name under <set>_answers/")
    s.add_argument("--models", help="comma-separated model folder names, scored in one run")
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

    a = sub.add_parser(
        "agreement",
        help="compare two judges' scores on the same answers (per metric Pearson/Spearman, exact/within-1, MAD)",
        description="A and B are each an eval folder with <set>_reviews/, a judge_results/<model>.jsonl store, or an "
        "RM_data JSON file (e.g. RM_data/test/rm_test.json: the GPT-4 reviews); matched on (model, id, metric).",
    )
    a.add_argument("a", help="judge A's scores")
    a.add_argument("b", help="judge B's scores")
    a.add_argument("--format", choices=("md", "csv", "json"), default="md", help="what to print")
    a.add_argument("--out", help="write agreement.md/.csv/.json and agreement_scatter.png here")
    a.add_argument("--no-plots", action="store_true")
    a.set_defaults(func=cmd_agreement)

    q = sub.add_parser(
        "prompts",
        help="dry run: write every judge request a scoring run would send, with token estimates",
        description="One JSON line per (answered sample, metric): {model, set, type, id, metric, system, prompt, "
        "image}; a summary of counts and estimated prompt tokens per model goes to stderr.",
    )
    q.add_argument("dir", help="eval folder holding <set>_answers/<model>/<type>_test.json")
    q.add_argument("--models", help="comma-separated subset of models (default: all)")
    q.add_argument("--judge-template", help="judge template YAML or the original RM_review.py (default: packaged)")
    q.add_argument("--metrics", help="comma-separated subset of the 8 metrics")
    q.add_argument("--tokenizer", help="count tokens exactly with this local tokenizer (default: estimate)")
    q.add_argument("--out", help="write the JSON lines here (default: stdout)")
    q.set_defaults(func=cmd_prompts)

    t = sub.add_parser(
        "import-template",
        help="convert the original MMRole judging script (eval/RM_review.py) into a judge template YAML",
        description="Read RM_review.py as data (parsed, never executed) and write the judge template it amounts "
        "to; with it the judge requests equal the original's byte for byte. --judge-template also takes the script.",
    )
    t.add_argument("script", help="path to RM_review.py (from a checkout of the MMRole repository)")
    t.add_argument("-o", "--out", required=True, help="template YAML to write")
    t.set_defaults(func=cmd_import_template)

    c = sub.add_parser(
        "converse",
        help="whole conversations: each model talks N turns with a partner; judged per turn and as a whole",
        description="Runs jobs/converse.py's pipeline (Ray Data, resumable turn by turn): conversations, judging "
        "(absolute and/or pairwise), and the report under <out>/converse/report/ (drift by turn, repetition, "
        "win rates). --report-only rewrites the report from the stores without Ray.",
    )
    c.add_argument("--config", help="YAML config (ConverseJobConfig; e.g. configs/eval/converse_tiny_cpu.yaml)")
    c.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    c.add_argument("--report-only", action="store_true", help="only (re)write the report from the stores")
    c.add_argument("--no-plots", action="store_true")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. turns=6 max_items=10")
    c.set_defaults(func=cmd_converse)


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
        radar = [m.strip() for m in args.radar_models.split(",")] if args.radar_models else None
        paths = write_report(rep, args.out, plots=plots, radar_models=radar)
        print(f"wrote {len(paths)} files under {args.out}", file=sys.stderr)
    return 0


def _judge_config(args):
    import yaml

    from .openai_judge import OpenAIJudgeConfig

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


def _model_list(args) -> list[str]:
    names = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if args.model:
        names.insert(0, args.model)
    if not names:
        raise ValueError("no model: give --model NAME or --models A,B")
    return list(dict.fromkeys(names))


def cmd_score(args) -> int:
    from .aggregate import position_bias
    from .cache_keys import judgement_keys, openai_judge_identity
    from .contract import expand_requests
    from .formats import EvalDataError
    from .judges import JudgeConfigError
    from .metrics import check_metrics
    from .openai_judge import OpenAIJudge
    from .pipeline import load_answers_dir, score_requests, write_model_outputs
    from .store import store_for

    try:
        cfg = _judge_config(args)
        judge = OpenAIJudge(cfg)
        metrics = check_metrics([m.strip() for m in args.metrics.split(",")] if args.metrics else None)
        models = _model_list(args)
        loaded = {m: load_answers_dir(args.dir, m) for m in models}
    except (ValueError, JudgeConfigError, EvalDataError) as e:
        print(f"mmrole eval score: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.dir)
    identity = openai_judge_identity(cfg)
    reports, rc = {}, 0
    for model, (answers, stats) in loaded.items():
        for st in stats:
            print(st.summary(), file=sys.stderr)
        empty = [a.id for a in answers if not a.answer.strip()]
        if empty:  # as in the original: reported and excluded
            print(f"{model}: {len(empty)} empty answers excluded: {empty[:10]}", file=sys.stderr)
        answers = [a for a in answers if a.answer.strip()]
        try:
            requests = expand_requests(answers, metrics, swapped=args.swap)
        except ValueError as e:
            print(f"mmrole eval score: {model}: {e}", file=sys.stderr)
            return 2
        store = store_for(out, model, swapped=args.swap, cache_keys=judgement_keys(requests, identity, judge.template))
        todo = store.pending(requests, retry_failed=args.retry_failed)
        if store.warning():
            print(f"warning: {store.warning()}", file=sys.stderr)
        print(
            f"{model}: {len(requests)} requests, {len(requests) - len(todo)} already scored by this judge",
            file=sys.stderr,
        )
        bar = None
        if todo:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc=f"scoring {model}", unit="req", mininterval=1.0)
        done_before = [0]

        def progress(s, bar=bar, done_before=done_before):
            if bar is not None:
                bar.update(s.n_scored - done_before[0])
                bar.set_postfix(failed=s.n_failed)
                done_before[0] = s.n_scored

        try:
            summary = score_requests(requests, judge, store, args.batch_size, args.retry_failed, progress)
        except JudgeConfigError as e:
            print(f"\nmmrole eval score: {e}", file=sys.stderr)
            return 2
        finally:
            if bar is not None:
                bar.close()
        audit = store.audit(r.key for r in requests)
        report = {"scoring": summary.to_dict(), "store": str(store.path), "audit": audit.to_dict()}
        if not audit.complete:
            print(f"{model}: store incomplete ({len(audit.missing)} missing); rerun to resume", file=sys.stderr)
            rc = 1
        elif args.swap:  # compare with the normal run (keys scored in both)
            bias = position_bias(store_for(out, model).load(), store.load(), metrics)
            report["position_bias"] = {m: b.to_dict() for m, b in bias.items()}
        else:
            for p in write_model_outputs(out, model, answers, store.load(), metrics):
                print(f"wrote {p}", file=sys.stderr)
        reports[model] = report
    print(json.dumps(reports[models[0]] if len(models) == 1 else reports, indent=2))
    return rc


def cmd_agreement(args) -> int:
    from .agreement import compare, load_judgements, render_agreement_markdown, write_agreement
    from .formats import EvalDataError
    from .store import StoreError

    try:
        (ja, fa), (jb, fb) = load_judgements(args.a), load_judgements(args.b)
    except (EvalDataError, StoreError, OSError) as e:
        print(f"mmrole eval agreement: {e}", file=sys.stderr)
        return 2
    ag = compare(ja, jb, args.a, args.b, failed=(fa, fb))
    if ag.n_common == 0:
        print(f"mmrole eval agreement: {args.a} and {args.b} share no (model, id, metric) scores", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(ag.to_dict(), indent=2))
    elif args.format == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(ag.stats[0].to_dict()))
        w.writeheader()
        for s in ag.stats:
            w.writerow(s.to_dict())
        print(buf.getvalue(), end="")
    else:
        print(render_agreement_markdown(ag), end="")
    if args.out:
        plots = not args.no_plots and importlib.util.find_spec("matplotlib") is not None
        paths = write_agreement(ag, args.out, plots=plots)
        print(f"wrote {len(paths)} files under {args.out}", file=sys.stderr)
    return 0


def cmd_prompts(args) -> int:
    from .formats import EvalDataError
    from .prompts import estimate_tokens, hf_token_counter, write_prompts
    from .template import JudgeTemplateError
    from .template_loader import load_judge_template

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    try:
        template = load_judge_template(args.judge_template)
        counter = hf_token_counter(args.tokenizer) if args.tokenizer else estimate_tokens
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") if args.out else _stdout() as f:
            stats = write_prompts(args.dir, template, f, models, metrics, counter)
    except (ValueError, OSError, JudgeTemplateError, EvalDataError) as e:
        print(f"mmrole eval prompts: {e}", file=sys.stderr)
        return 2
    how = "counted with " + args.tokenizer if args.tokenizer else "estimated, ~4 chars/token; images not included"
    print(f"judge template: {template.source}", file=sys.stderr)
    print(f"| model | answers | empty (skipped) | requests | prompt tokens ({how}) |", file=sys.stderr)
    print("| --- | ---: | ---: | ---: | ---: |", file=sys.stderr)
    for st in stats:
        print(f"| {st.model} | {st.n_answers} | {st.n_empty} | {st.n_requests} | {st.prompt_tokens} |", file=sys.stderr)
        for r in st.rejected:
            print(f"  rejected: {r}", file=sys.stderr)
    if args.out:
        print(f"wrote {sum(s.n_requests for s in stats)} requests to {args.out}", file=sys.stderr)
    return 0


def _stdout():
    import contextlib

    return contextlib.nullcontext(sys.stdout)


def cmd_import_template(args) -> int:
    from .original_judge import convert_original_script
    from .template import JudgeTemplate, JudgeTemplateError, dump_judge_template
    from .template_loader import load_judge_template

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


def cmd_converse(args) -> int:
    from mmrole.config import ConfigError, config_error_message, config_to_yaml, load_config_file, resolve_paths

    from .converse_config import ConverseJobConfig

    try:
        cfg = resolve_paths(load_config_file(ConverseJobConfig, args.config, args.overrides))
    except ConfigError as e:
        print(config_error_message(e), file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from mmrole.ray_converse_judging import run_converse_job, write_converse_outputs

    try:
        if args.report_only:
            from .converse_report import render_converse_markdown

            rep, paths = write_converse_outputs(cfg, plots=not args.no_plots)
            print(render_converse_markdown(rep))
            print(f"wrote {len(paths)} files under {Path(cfg.out) / 'converse' / 'report'}", file=sys.stderr)
            return 0
        from mmrole.ray_env import init_ray

        started = []

        def start_ray():
            if not started:
                init_ray(cfg.ray_address)
                started.append(True)

        run_converse_job(cfg, start_ray=start_ray)
    except (ValueError, OSError) as e:
        print(f"mmrole eval converse: {e}", file=sys.stderr)
        return 2
    return 0
