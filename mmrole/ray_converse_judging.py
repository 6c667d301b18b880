"""Ray glue of ``mmrole eval converse``, second half: the stored conversations judged through one pool of judge
replicas (per turn and whole conversations, absolute and pairwise), the report over the stores, and the whole job
(conversations, judging, report; each stage resumes from its stores)."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from mmrole.eval.converse import (
    Cast,
    Conversation,
    conversation_requests,
    pairwise_conversation_requests,
    pairwise_turn_requests,
    turn_requests,
)
from mmrole.eval.converse_config import ConverseJobConfig
from mmrole.ray_converse import (
    Log,
    _log,
    build_cast,
    conversation_finished,
    converse_dir,
    load_conversations,
    run_converse,
)
from mmrole.ray_eval import pool_args, progress_bar


# ------------------------------------------------------------------------------------------------ judging
class ConverseJudgeWorker:
    """A judge replica with one judge per template (turn / conversation, absolute / pairwise) over one model."""

    def __init__(self, judge: dict, templates: dict, images_root: str):
        from mmrole.config import build_dataclass
        from mmrole.eval.job_config import JudgeSettings
        from mmrole.eval.template_loader import load_judge_template

        settings = build_dataclass(JudgeSettings, judge)
        loaded = {k: load_judge_template(p) for k, p in templates.items()}
        if settings.kind == "local":
            from mmrole.eval.judges import VLMJudge
            from mmrole.models import build_vlm

            vlm = build_vlm(settings.model)  # one model, shared by the templates
            name = f"local:{Path(settings.model.model_path).name}"
            self.judges = {
                k: VLMJudge(
                    vlm, settings.generation, settings.max_retries, template=t, images_root=images_root, name=name
                )
                for k, t in loaded.items()
            }
        else:
            from mmrole.eval.openai_judge import OpenAIJudge

            oc = settings.openai
            if oc.images_root is None:
                oc.images_root = images_root
            self.judges = {k: OpenAIJudge(oc, t) for k, t in loaded.items()}

    def __call__(self, batch: dict) -> dict:
        from mmrole.eval.contract import JudgeRequest

        n = len(batch["request"])
        out = [""] * n
        groups: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(batch["template"]):
            groups[str(t)].append(i)
        for t, idx in groups.items():
            reqs = [JudgeRequest.from_dict(json.loads(batch["request"][i])) for i in idx]
            for i, r in zip(idx, self.judges[t].score_batch(reqs)):
                out[i] = json.dumps(r.to_dict(), ensure_ascii=False)
        return {
            "result": np.array(out, dtype=object),
            "store": np.array([str(x) for x in batch["store"]], dtype=object),
        }


def plan_judging(cfg: ConverseJobConfig, convs: dict[str, list[Conversation]], cast: Cast) -> dict:
    """Per store (``<model>.turns``, ``<model>.conversation``, ``pairwise/<a>__<b>.turns`` / ``.conversation``):
    its template kind, requests and ResultsStore keyed by this judge and template. Only finished conversations are
    judged (complete, or ended by a failed turn)."""
    from mmrole.eval.cache_keys import judge_identity, judgement_keys
    from mmrole.eval.store import ResultsStore
    from mmrole.eval.template_loader import load_judge_template

    templates = {k: load_judge_template(p) for k, p in cfg.templates.judge_templates().items()}
    identity = judge_identity(cfg.judge)
    base = converse_dir(cfg) / "judge_results"
    plans: dict[str, dict] = {}

    def add(tag: str, kind: str, requests: list) -> None:
        # A store holds one orientation (ResultsStore refuses a mix): pairwise requests shown swapped go to
        # <tag>.swapped; results are stored un-swapped either way (score_a = the first model).
        for suffix, part in (
            ("", [r for r in requests if not r.swapped]),
            (".swapped", [r for r in requests if r.swapped]),
        ):
            if suffix and not part:
                continue
            store = ResultsStore(base / f"{tag}{suffix}.jsonl", judgement_keys(part, identity, templates[kind]))
            plans[tag + suffix] = dict(kind=kind, requests=part, store=store)

    finished = {m: [c for c in cs if conversation_finished(c, cfg.turns)] for m, cs in convs.items()}
    if "absolute" in cfg.scoring:
        for m, cs in finished.items():
            add(f"{m}.turns", "turn", [r for c in cs for r in turn_requests(cast, c, templates["turn"])])
            add(
                f"{m}.conversation",
                "conversation",
                [r for c in cs for r in conversation_requests(cast, c, templates["conversation"])],
            )
    if "pairwise" in cfg.scoring and len(cfg.models) > 1:
        names = [m.name for m in cfg.models]
        for ai, a in enumerate(names):
            for b in names[ai + 1 :]:
                by_item = {c.item.id: c for c in finished[b]}
                pairs = [(c, by_item[c.item.id]) for c in finished[a] if c.item.id in by_item]
                add(
                    f"pairwise/{a}__{b}.turns",
                    "pairwise_turn",
                    [
                        r
                        for x, y in pairs
                        for r in pairwise_turn_requests(cast, x, y, templates["pairwise_turn"], cfg.seed)
                    ],
                )
                add(
                    f"pairwise/{a}__{b}.conversation",
                    "pairwise_conversation",
                    [
                        r
                        for x, y in pairs
                        for r in pairwise_conversation_requests(
                            cast, x, y, templates["pairwise_conversation"], cfg.seed
                        )
                    ],
                )
    return plans


def run_converse_scoring(
    cfg: ConverseJobConfig,
    log: Log = _log,
    stop_after: Optional[int] = None,
    start_ray: Optional[Callable[[], None]] = None,
) -> dict:
    """Judge every stored conversation (per turn and whole, absolute and/or pairwise) that the stores lack for this
    judge and template; one pool of judge replicas. Unparsable replies are failures, never scores."""
    if cfg.judge is None:
        raise ValueError("judge: no judge configured (judge.kind=local|openai ...)")
    t0 = time.perf_counter()
    items, _, cast, images = build_cast(cfg, lambda _msg: None)
    convs = load_conversations(cfg, items, cast, log)
    plans = plan_judging(cfg, convs, cast)
    todo = []
    for tag, p in plans.items():
        pend = p["store"].pending(p["requests"], retry_failed=cfg.retry_failed)
        log(f"[converse-score] {tag}: {len(p['requests'])} requests, {len(pend)} to do")
        todo.extend((tag, p["kind"], r) for r in pend)
    n_new = 0
    if todo:
        import pyarrow as pa
        import ray

        from mmrole.eval.contract import JudgeResult

        if cfg.judge.kind == "openai":  # a missing key fails here, naming it
            from mmrole.eval.openai_judge import OpenAIJudge

            OpenAIJudge(cfg.judge.openai)
        if start_ray is not None:
            start_ray()
        bs = max(1, cfg.judge_pool.batch_size)
        enc = [json.dumps(r.to_dict(), ensure_ascii=False) for _, _, r in todo]
        tags = [t for t, _, _ in todo]
        kinds = [k for _, k, _ in todo]
        ds = ray.data.from_arrow(
            [
                pa.table({"request": enc[i : i + bs], "store": tags[i : i + bs], "template": kinds[i : i + bs]})
                for i in range(0, len(todo), bs)
            ]
        )
        ds = ds.map_batches(
            ConverseJudgeWorker,
            fn_constructor_kwargs=dict(
                judge=asdict(cfg.judge), templates=cfg.templates.judge_templates(), images_root=images
            ),
            **pool_args(cfg.judge_pool),
        )
        expected: dict[str, set] = defaultdict(set)
        for tag, _, r in todo:
            expected[tag].add(r.key)
        written: dict[str, set] = defaultdict(set)
        bar = progress_bar(len(todo), "judging conversations", cfg.progress)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                fresh: dict[str, list] = defaultdict(list)
                for x, tag in zip(batch["result"], batch["store"]):
                    r = JudgeResult.from_dict(json.loads(x))
                    if r.key in expected[str(tag)] and r.key not in written[str(tag)]:
                        fresh[str(tag)].append(r)
                        written[str(tag)].add(r.key)
                for tag, results in fresh.items():
                    plans[tag]["store"].append(results)
                    n_new += len(results)
                if bar is not None:
                    bar.update(sum(len(v) for v in fresh.values()))
                if stop_after is not None and n_new >= stop_after:
                    return {"stopped": True, "scored": n_new}
        finally:
            if bar is not None:
                bar.close()
    summary: dict = {"stores": {}, "scored_now": n_new}
    for tag, p in plans.items():
        keys = {r.key for r in p["requests"]}
        results = [r for k, r in p["store"].load().items() if k in keys]
        summary["stores"][tag] = {
            "requests": len(keys),
            "parsed": sum(r.ok for r in results),
            "failed": sum(not r.ok for r in results),
            "missing": len(keys) - len(results),
            "failure_reasons": dict(Counter((r.error or "failed").split(":")[0] for r in results if not r.ok)),
        }
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"[converse-score] done: {json.dumps(summary, default=str)[:3000]}")
    return summary


# ------------------------------------------------------------------------------------------------- report
def write_converse_outputs(cfg: ConverseJobConfig, log: Log = _log, plots: bool = True):
    """The report over what the stores hold (no Ray): ``<out>/converse/report/``. Returns (report, paths)."""
    import importlib.util

    from mmrole.eval.converse_report import build_converse_report, write_converse_report

    items, _, cast, _ = build_cast(cfg, lambda _msg: None)
    convs = load_conversations(cfg, items, cast, log)
    turn_res: dict = {}
    conv_res: dict = {}
    pair_res: dict = {}
    if cfg.judge is not None:
        plans = plan_judging(cfg, convs, cast)
        for tag, p in plans.items():
            keys = {r.key for r in p["requests"]}
            results = {k: r for k, r in p["store"].load().items() if k in keys}
            if tag.startswith("pairwise/"):
                pair, level = tag[len("pairwise/") :].split(".", 1)
                a, b = pair.split("__", 1)
                level = level.replace(".swapped", "")
                pair_res.setdefault((a, b), {}).setdefault("turn" if level == "turns" else level, {}).update(results)
            else:
                model, level = tag.rsplit(".", 1)
                (turn_res if level == "turns" else conv_res)[model] = results
    rep = build_converse_report(
        convs,
        turn_res,
        conv_res,
        pair_res,
        turns=cfg.turns,
        bootstrap=cfg.bootstrap,
        seed=cfg.seed,
        repetition_n=cfg.repetition_n,
    )
    if plots and importlib.util.find_spec("matplotlib") is None:
        log("[converse] warning: matplotlib is not installed (pip install 'mmrole[plots]'); writing no plots")
        plots = False
    paths = write_converse_report(rep, converse_dir(cfg) / "report", plots=plots)
    return rep, paths


def run_converse_job(cfg: ConverseJobConfig, log: Log = _log, start_ray: Optional[Callable[[], None]] = None) -> dict:
    """Conversations, then (with a judge) their judging, then the report; each stage resumes from its stores."""
    from mmrole.eval.converse_report import render_converse_markdown

    summary = {"conversations": run_converse(cfg, log, start_ray=start_ray)}
    if cfg.judge is not None:
        summary["judging"] = run_converse_scoring(cfg, log, start_ray=start_ray)
    rep, paths = write_converse_outputs(cfg, log)
    log(render_converse_markdown(rep))
    log(f"[converse] report written to {converse_dir(cfg) / 'report'} ({len(paths)} files)")
    summary["report"] = [str(p) for p in paths]
    return summary
