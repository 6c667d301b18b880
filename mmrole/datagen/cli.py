"""Argument parsing and entry points of ``mmrole data generate | import-card | export-card``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmrole.data.records import GROUPS, infer_language, role_file_stem


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--characters", help="characters YAML (characters: [{name, source, raw_text, language, ...}])")
    p.add_argument("--images", help="folder of images (optional annotations.json inside)")
    p.add_argument("--out", help="dataset root to write (published MMRole layout)")
    p.add_argument("--config", default=None, help="generate config YAML (teacher, gates, dialogues, ...)")
    p.add_argument("--ray", action="store_true", help="run the teacher stages as Ray Data pipelines (executor=ray)")
    p.add_argument("--estimate-only", action="store_true", help="print the calls and cost estimate; call nothing")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. teacher.model=gpt-4o-mini")


def build_config(args):
    from .config import load_generate_config

    overrides = list(args.overrides)
    for k in ("characters", "images", "out"):
        if getattr(args, k):
            overrides.append(f"{k}={getattr(args, k)}")
    if args.ray:
        overrides.append("executor=ray")
    return load_generate_config(args.config, overrides)


def print_summary(summary: dict) -> None:
    for name, c in summary["stages"].items():
        why = f" {c['rejected_by_reason']}" if c["rejected_by_reason"] else ""
        print(f"{name}: in {c['in']}, out {c['out']}, rejected {c['rejected']}{why}")
    for who in ("teacher", "judge"):
        t = summary.get(who)
        if t:
            print(
                f"{who} {t['model']}: {t['requests']} requests ({t['http_attempts']} HTTP attempts, "
                f"{t['cache_hits']} cached), {t['prompt_tokens']} prompt + {t['completion_tokens']} completion "
                f"tokens, ~${t['cost_usd']}"
            )
    print(f"test split: {summary['test_split']}")
    print(f"wrote {summary['out']} (generate_summary.json, rejects.jsonl: {summary['rejects']} rejects)")
    if summary["stages_with_nothing_usable"]:
        print(f"nothing usable from stage(s) {summary['stages_with_nothing_usable']}", file=sys.stderr)


def run_generate(args) -> int:
    """Exit 0 when every stage gave something usable, 1 otherwise (2 for a config error, raised to the caller)."""
    from .config import load_characters
    from .pipeline import DataGenerator, GenerateError
    from .teacher import TeacherAuthError, TeacherClient

    cfg = build_config(args)
    gen = DataGenerator(cfg, progress=lambda s: print(s, file=sys.stderr, flush=True))
    if args.estimate_only:
        print(json.dumps(gen.estimate(), indent=1))
        return 0
    load_characters(cfg.characters)  # a bad characters file fails before anything else (ConfigError)
    try:
        TeacherClient(cfg.teacher)  # fail early on a missing API key, before any stage runs
        if cfg.judge.enabled and cfg.judge.teacher is not None:
            TeacherClient(cfg.judge.teacher)
        if cfg.executor == "ray":
            from mmrole.ray_datagen import RayExecutor
            from mmrole.ray_env import init_ray

            init_ray(cfg.ray_address)
            gen.executor_factory = lambda teacher: RayExecutor(teacher, cfg.ray_actors)
        summary = gen.run()
    except (GenerateError, TeacherAuthError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0 if summary["ok"] else 1


def add_card_arguments(imp: argparse.ArgumentParser, exp: argparse.ArgumentParser) -> None:
    imp.add_argument("card", help="a Character Card V2: .json, or .png with a 'chara' text chunk")
    imp.add_argument("--out", required=True, help="dataset root to add the character to")
    imp.add_argument("--group", default="in-distribution", choices=GROUPS)
    imp.add_argument("--script", default="Character Cards", help="the work the character comes from (roles.json)")
    imp.add_argument("--language", default=None, choices=("English", "Chinese"), help="default: from the text")
    exp.add_argument("root", help="dataset root (published layout)")
    exp.add_argument("--name", required=True, help="the character's name")
    exp.add_argument("--out", required=True, help="card file to write: .json or .png")
    exp.add_argument("--image", default=None, help="PNG export: the picture to embed the card in")


def _load_json(path: Path, default):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def run_import_card(args) -> int:
    from .cards import CardError, card_to_profile, read_card

    try:
        card = read_card(args.card)
    except CardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    data = card["data"]
    name = data["name"].strip()
    language = args.language or infer_language(name, data["description"] + data["personality"])
    md, structured = card_to_profile(card, language)
    pdir = Path(args.out) / "profiles" / args.group
    pdir.mkdir(parents=True, exist_ok=True)
    roles = _load_json(pdir / "roles.json", {})
    profiles = _load_json(pdir / "profiles.json", {})
    if not any(name in v for v in roles.values()):
        roles.setdefault(args.script, []).append(name)
    profiles[name] = md
    (pdir / "roles.json").write_text(json.dumps(roles, ensure_ascii=False, indent=1), encoding="utf-8")
    (pdir / "profiles.json").write_text(json.dumps(profiles, ensure_ascii=False, indent=1), encoding="utf-8")
    (pdir / "detailed_profiles").mkdir(exist_ok=True)
    (pdir / "detailed_profiles" / f"{role_file_stem(name)}.json").write_text(
        json.dumps(structured, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    print(f"imported {name!r} ({language}) into {pdir} (first message kept as a dialogue seed: first_message)")
    return 0


def run_export_card(args) -> int:
    from .cards import profile_to_card, write_card

    root = Path(args.root)
    stem = role_file_stem(args.name)
    for group in GROUPS:
        pdir = root / "profiles" / group
        profiles = _load_json(pdir / "profiles.json", {})
        if args.name not in profiles:
            continue
        detailed = _load_json(pdir / "detailed_profiles" / f"{stem}.json", None)
        card = profile_to_card(args.name, profiles[args.name], detailed)
        path = write_card(card, args.out, args.image)
        print(f"wrote {path} (Character Card V2)")
        return 0
    print(f"error: {root}: no profile for {args.name!r} in profiles/*/profiles.json", file=sys.stderr)
    return 1
