"""Ray glue of the evaluation jobs: answering and scoring as Ray Data batch inference over actor pools.

The driver owns the append-only stores: it streams results back from the pool and appends each one once, so
a rerun resumes (ids / (id, metric) keys already stored are skipped) and a replica or node lost mid-run only
makes Ray restart the replica and retry its blocks; a key delivered twice by a retry is written once.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from mmrole.data.records import TEST_SETS, Sample
from mmrole.eval.job_config import GenerateJobConfig, JudgeSettings, PoolSettings, ScoreJobConfig

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, flush=True)


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: batch[k][i] for k in keys} for i in range(n)]


def pool_args(pool: PoolSettings) -> dict:
    """map_batches arguments of an actor pool whose replicas are restarted, and blocks retried, on failure."""
    import ray

    c = pool.concurrency_arg()
    size = dict(size=c) if isinstance(c, int) else dict(min_size=c[0], max_size=c[1])
    args = dict(
        compute=ray.data.ActorPoolStrategy(**size),
        batch_size=pool.batch_size,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
    )
    if pool.max_restarts != -1:
        # Ray Data's actor pools restart without limit and retry blocks by default; passing restart options is a
        # deprecated remote argument (Ray 2.60, removed in 2.64), so only a non-default setting is passed.
        args |= dict(max_restarts=pool.max_restarts, max_task_retries=-1 if pool.max_restarts else 0)
    return args


# ------------------------------------------------------------------------------------------------ answering
class AnswerWorker:
    """A replica of the agent: a batch of Sample rows -> their answers, or per-sample errors (an unreadable image,
    a prompt too long for the model, an endpoint that gave up): one bad sample fails alone, recorded."""

    def __init__(self, agent: dict, generation: dict, images_root: str):
        from mmrole.config import build_dataclass
        from mmrole.eval.job_config import AgentSettings
        from mmrole.models import GenerationParams

        settings = build_dataclass(AgentSettings, agent)
        self.params = GenerationParams.from_dict(generation)
        self.images_root = images_root
        self.remote = None
        if settings.kind == "openai":
            from mmrole.eval.remote_agent import OpenAIAgent

            self.remote = OpenAIAgent(settings.openai, self.params)
        else:
            from mmrole.models.vllm_engine import build_engine

            self.vlm = build_engine(settings.vlm_config(), settings.engine, settings.vllm)

    def _local(self, samples: list[Sample]) -> list[tuple[str, str]]:
        from mmrole.data.images import ImageError, load_image

        out: list[tuple[str, str]] = [("", "")] * len(samples)
        ok, images = [], []
        for i, s in enumerate(samples):
            try:
                images.append(load_image(self.images_root, s.image))
                ok.append(i)
            except ImageError as e:
                out[i] = ("", f"image: {e}")
        encoded = self.vlm.encode_prompts([samples[i] for i in ok], images, self.params) if ok else []
        todo = []
        for i, e in zip(ok, encoded):
            if isinstance(e, Exception):  # SampleTooLong and the like: this sample alone fails
                out[i] = ("", f"prompt: {type(e).__name__}: {e}")
            else:
                todo.append((i, e))
        if todo:
            texts = self.vlm.generate_encoded([e for _, e in todo], self.params)
            for (i, _), t in zip(todo, texts):  # engine: vllm returns a refused prompt's error in its place
                out[i] = (t, "") if isinstance(t, str) else ("", f"prompt: {type(t).__name__}: {t}")
        return out

    def _remote(self, samples: list[Sample]) -> list[tuple[str, str]]:
        from mmrole.data.images import resolve_image_path

        items, out, idx = [], [("", "")] * len(samples), []
        for i, s in enumerate(samples):
            path = resolve_image_path(self.images_root, s.image)
            try:
                items.append((s.system, s.user_text, path.read_bytes(), s.image))
                idx.append(i)
            except OSError as e:
                out[i] = ("", f"image: cannot read {path} ({e})")
        for i, res in zip(idx, self.remote.answer(items) if items else []):
            out[i] = res
        return out

    def __call__(self, batch: dict) -> dict:
        samples = [Sample.from_row(row) for row in _rows(batch)]
        res = self._remote(samples) if self.remote is not None else self._local(samples)
        return {
            "id": np.array([s.id for s in samples], dtype=object),
            "answer": np.array([a for a, _ in res], dtype=object),
            "error": np.array([e for _, e in res], dtype=object),
        }


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (rate, ETA) on stderr; None when disabled or nothing to do."""
    if not enabled or total <= 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, mininterval=1.0)


def _usable_answers(records: list[tuple[int, dict]], keys: dict[str, str]) -> tuple[dict[str, dict], dict]:
    """Per id, the stored answer made by this agent from this sample (first success wins, else the latest
    failure), and counts of lines not reused (no key: older store; another key: another agent/template)."""
    out: dict[str, dict] = {}
    skipped = {"unkeyed": 0, "stale": 0}
    for _, rec in records:
        rid = rec.get("id")
        if rid not in keys:
            continue
        if rec.get("cache_key") != keys[rid]:
            skipped["stale" if rec.get("cache_key") else "unkeyed"] += 1
            continue
        prev = out.get(rid)
        if prev is None or prev.get("error"):
            out[rid] = rec
    return out, skipped


def run_generate(
    cfg: GenerateJobConfig,
    log: Log = _log,
    stop_after: Optional[int] = None,
    start_ray: Optional[Callable[[], None]] = None,
) -> dict:
    """Answer every sample of ``cfg.split`` in ``cfg.sets`` that the store lacks for this agent; write the answers
    files. Nothing to do (all answered by this agent, generation parameters and template) returns at once,
    without starting Ray (``start_ray`` is called only when there is work)."""
    from mmrole.data.prepared import images_root as prepared_images_root
    from mmrole.data.prepared import iter_samples
    from mmrole.eval.cache_keys import agent_identity, answer_key, digest
    from mmrole.eval.contract import SET_TO_GROUP
    from mmrole.eval.formats import answer_record_dict, write_answers_file
    from mmrole.eval.store import JsonlStore

    t0 = time.perf_counter()
    out = Path(cfg.out)
    store = JsonlStore(out / "answer_store" / f"{cfg.model_name}.jsonl")
    wanted_groups = {SET_TO_GROUP[s] for s in cfg.sets if s in SET_TO_GROUP}
    unknown_sets = [s for s in cfg.sets if s not in SET_TO_GROUP]
    if unknown_sets:
        raise ValueError(f"sets: unknown set(s) {unknown_sets}; known {sorted(SET_TO_GROUP)}")
    samples = [s for s in iter_samples(cfg.data, cfg.split) if s.group in wanted_groups]
    if cfg.max_samples is not None:
        samples = samples[: cfg.max_samples]
    agent_digest = digest(agent_identity(asdict(cfg.agent), cfg.generation))
    keys = {s.id: answer_key(agent_digest, s.system, s.user_text, s.image) for s in samples}
    done, skipped = _usable_answers(store.read_records()[0], keys)
    if skipped["unkeyed"] or skipped["stale"]:
        log(
            f"[answers] warning: {store.path}: {skipped['unkeyed']} stored answer(s) without a cache key (older "
            f"mmrole) and {skipped['stale']} from another agent, generation parameters or template are not reused"
        )
    todo_ids = {s.id for s in samples if s.id not in done or (cfg.retry_failed and done[s.id].get("error"))}
    log(
        f"[answers] {len(samples)} samples in {cfg.sets}; {len(samples) - len(todo_ids)} already answered by this "
        f"agent, {len(todo_ids)} to do"
    )
    n_new = 0
    if todo_ids:
        import ray

        if cfg.agent.kind == "openai":  # a missing key fails here, naming it, not in every replica's constructor
            from mmrole.eval.remote_agent import OpenAIAgent

            OpenAIAgent(cfg.agent.openai, cfg.generation)
        if start_ray is not None:
            start_ray()
        rows = [s.to_row() for s in samples if s.id in todo_ids]
        # Blocks of about one batch each, so every replica of the pool gets work.
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // max(1, cfg.pool.batch_size), 256)))
        ds = ds.map_batches(
            AnswerWorker,
            fn_constructor_kwargs=dict(
                agent=asdict(cfg.agent),
                generation=asdict(cfg.generation),
                images_root=str(prepared_images_root(cfg.data)),
            ),
            **pool_args(cfg.pool),
        )
        written: set[str] = set()
        bar = progress_bar(len(todo_ids), f"answering ({cfg.model_name})", cfg.progress)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                recs = [
                    {"id": str(i), "answer": str(a), "error": str(e), "cache_key": keys[str(i)]}
                    for i, a, e in zip(batch["id"], batch["answer"], batch["error"])
                    if str(i) not in written
                ]
                store.append_records(recs)
                written.update(r["id"] for r in recs)
                n_new += len(recs)
                if bar is not None:
                    bar.update(len(recs))
                else:
                    log(f"[answers] {len(samples) - len(todo_ids) + n_new}/{len(samples)} answered")
                if stop_after is not None and n_new >= stop_after:
                    log("[answers] stopping early (stop_after)")
                    return {"stopped": True, "answered": n_new}
        finally:
            if bar is not None:
                bar.close()
        done, _ = _usable_answers(store.read_records()[0], keys)
    by_file: dict[tuple[str, str], list[dict]] = defaultdict(list)
    reasons: Counter = Counter()
    failed = []
    for s in samples:
        rec = done[s.id]
        if rec.get("error"):
            reasons[rec["error"].split(":")[0]] += 1
            failed.append({"id": s.id, "error": rec["error"]})
        # A failed sample keeps an empty answer in the published format (as unanswered samples do there); the
        # scorer reports and excludes empty answers.
        by_file[(TEST_SETS[s.group], s.dialogue_type)].append(answer_record_dict(s, rec["answer"]))
    files_written = []
    for (set_name, dtype), recs in sorted(by_file.items()):
        path = out / f"{set_name}_answers" / cfg.model_name / f"{dtype}_test.json"
        write_answers_file(path, recs)
        files_written.append(str(path))
    empty = sum(1 for s in samples if not done[s.id]["answer"].strip() and not done[s.id].get("error"))
    summary = {
        "samples": len(samples),
        "answered": len(samples) - len(failed),
        "failed": len(failed),
        "failure_reasons": dict(reasons),
        "failures": failed[:20],
        "answered_now": n_new,
        "empty_answers": empty,
        "not_reused": skipped,
        "seconds": round(time.perf_counter() - t0, 2),
        "files": files_written,
    }
    log(f"[answers] done: {json.dumps(summary, ensure_ascii=False)}")
    return summary


# ------------------------------------------------------------------------------------------------- scoring
def build_judge(settings: JudgeSettings, images_root: str):
    """The judge a replica uses, from its settings."""
    from mmrole.eval.template_loader import load_judge_template

    template = load_judge_template(settings.template)
    if settings.kind == "local":
        from mmrole.eval.judges import VLMJudge
        from mmrole.models.vllm_engine import build_engine

        vlm = build_engine(settings.model, settings.engine, settings.vllm)
        return VLMJudge(
            vlm,
            settings.generation,
            max_retries=settings.max_retries,
            template=template,
            images_root=images_root,
            name=f"local:{Path(settings.model.model_path).name}" + (":vllm" if settings.engine == "vllm" else ""),
            constrained_scores=settings.constrained_scores,
        )
    if settings.kind == "openai":
        from mmrole.eval.openai_judge import OpenAIJudge

        oc = settings.openai
        if oc.images_root is None:
            oc.images_root = images_root
        return OpenAIJudge(oc, template)
    from mmrole.eval.serve_judge import ServeJudge  # kind == "serve"

    return ServeJudge(settings.serve_url, token=os.environ.get(settings.serve_token_env), images_root=images_root)


class JudgeWorker:
    """A replica of the judge: a batch of serialized JudgeRequests -> serialized JudgeResults (model tag kept)."""

    def __init__(self, judge: dict, images_root: str):
        from mmrole.config import build_dataclass

        self.judge = build_judge(build_dataclass(JudgeSettings, judge), images_root)

    def __call__(self, batch: dict) -> dict:
        from mmrole.eval.contract import JudgeRequest

        reqs = [JudgeRequest.from_dict(json.loads(r)) for r in batch["request"]]
        results = self.judge.score_batch(reqs)
        return {
            "result": np.array([json.dumps(r.to_dict(), ensure_ascii=False) for r in results], dtype=object),
            "model": np.array(list(batch["model"]), dtype=object),
        }


def judge_dataset(requests: list, tags: list[str], judge: JudgeSettings, images_root: str, pool: PoolSettings):
    """A Ray Data pipeline scoring ``requests`` (JudgeRequests) through a pool of judge replicas; each output row is
    a serialized JudgeResult (``result``) and its request's tag (``model``). One block per judge batch, in request
    order: a sample's metric requests stay in one batch, where the judge prefills their shared prompt prefix once
    (VLM.generate's shared-prefix path)."""
    import pyarrow as pa
    import ray

    bs = max(1, pool.batch_size)
    encoded = [json.dumps(r.to_dict(), ensure_ascii=False) for r in requests]
    ds = ray.data.from_arrow(
        [pa.table({"request": encoded[i : i + bs], "model": tags[i : i + bs]}) for i in range(0, len(requests), bs)]
    )
    return ds.map_batches(
        JudgeWorker,
        fn_constructor_kwargs=dict(judge=asdict(judge), images_root=images_root),
        **pool_args(pool),
    )


def plan_scoring(cfg: ScoreJobConfig, log: Log = _log) -> dict:
    """Per model: its answers, judge requests (empty answers excluded, as in the original), the store keyed by
    this judge, template and generation parameters, and what is still to score. No Ray."""
    from mmrole.eval.cache_keys import judge_identity, judgement_keys
    from mmrole.eval.contract import expand_requests
    from mmrole.eval.pipeline import load_answers_dir
    from mmrole.eval.store import ResultsStore
    from mmrole.eval.template_loader import load_judge_template

    out = Path(cfg.out or cfg.eval_dir)
    template = load_judge_template(cfg.judge.template)
    identity = judge_identity(cfg.judge)
    plans = {}
    for model in cfg.model_names():
        answers, stats = load_answers_dir(cfg.eval_dir, model)
        for st in stats:
            if st.rejected:
                log(f"[score] {model}: {st.summary()}")
        empty = [a for a in answers if not a.answer.strip()]
        if empty:  # as in the original: reported and excluded
            log(f"[score] {model}: {len(empty)} empty answers excluded: {[a.id for a in empty][:10]}")
        answers = [a for a in answers if a.answer.strip()]
        requests = expand_requests(answers, cfg.metrics, swapped=cfg.swap)
        suffix = ".swapped" if cfg.swap else ""
        store = ResultsStore(
            out / "judge_results" / f"{model}{suffix}.jsonl", judgement_keys(requests, identity, template)
        )
        todo = store.pending(requests, retry_failed=cfg.retry_failed)
        if store.warning():
            log(f"[score] warning: {store.warning()}")
        log(
            f"[score] {model}: {len(requests)} judge requests ({len(answers)} answers x metrics); "
            f"{len(requests) - len(todo)} already scored by this judge, {len(todo)} to do"
        )
        plans[model] = dict(
            answers=answers, requests=requests, store=store, todo=todo, empty=len(empty), load_stats=stats
        )
    return plans


def run_score(
    cfg: ScoreJobConfig,
    log: Log = _log,
    stop_after: Optional[int] = None,
    on_batch: Optional[Callable[[int], None]] = None,
    start_ray: Optional[Callable[[], None]] = None,
) -> dict:
    """Score every (model, sample, metric) the stores lack through one pool of judge replicas; then write each
    model's reviews and results CSVs. Nothing to do returns at once without starting Ray (``start_ray`` is called
    only when there is work). ``stop_after`` stops after that many new results (tests of resume).
    Returns a per-model summary (a single model's summary is also at the top level)."""
    from mmrole.eval.contract import JudgeResult
    from mmrole.eval.judge_settings import write_judge_settings
    from mmrole.eval.metrics import check_metrics
    from mmrole.eval.pipeline import write_model_outputs

    out = Path(cfg.out or cfg.eval_dir)
    t0 = time.perf_counter()
    plans = plan_scoring(cfg, log)
    todo = [(m, r) for m, p in plans.items() for r in p["todo"]]
    new = Counter()
    if todo:
        if cfg.judge.kind == "openai":  # a missing key fails here, naming it, not in every replica's constructor
            from mmrole.eval.openai_judge import OpenAIJudge

            OpenAIJudge(cfg.judge.openai)
        if start_ray is not None:
            start_ray()
        ds = judge_dataset([r for _, r in todo], [m for m, _ in todo], cfg.judge, cfg.images_root, cfg.pool)
        expected = {m: {r.key for r in p["todo"]} for m, p in plans.items()}
        written: dict[str, set] = {m: set() for m in plans}
        n_new = n_ok = 0
        bar = progress_bar(len(todo), "scoring", cfg.progress)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                fresh: dict[str, list] = defaultdict(list)
                for x, m in zip(batch["result"], batch["model"]):
                    r = JudgeResult.from_dict(json.loads(x))
                    if r.key in expected[m] and r.key not in written[m]:
                        fresh[m].append(r)
                        written[m].add(r.key)
                for m, results in fresh.items():
                    plans[m]["store"].append(results)
                    new[m] += len(results)
                    n_new += len(results)
                    n_ok += sum(r.ok for r in results)
                if bar is not None:
                    bar.update(sum(len(v) for v in fresh.values()))
                    bar.set_postfix(parsed=n_ok)
                else:
                    log(f"[score] {n_new}/{len(todo)} scored ({n_ok} parsed)")
                if on_batch:
                    on_batch(n_new)
                if stop_after is not None and n_new >= stop_after:
                    log("[score] stopping early (stop_after)")
                    return {"stopped": True, "scored": n_new}
        finally:
            if bar is not None:
                bar.close()
    summaries = {}
    for m, p in plans.items():
        store = p["store"]
        audit = store.audit({r.key for r in p["requests"]})
        if not audit.complete:
            raise RuntimeError(f"scoring of {m} incomplete: {audit.to_dict()}")
        results = store.load()
        summary = {
            "requests": len(p["requests"]),
            "scored_now": new[m],
            "parsed": sum(r.ok for r in results.values()),
            "failed": sum(not r.ok for r in results.values()),
            "failure_reasons": dict(Counter((r.error or "failed").split(":")[0] for r in results.values() if not r.ok)),
            "empty_answers_excluded": p["empty"],
            "store": str(store.path),
        }
        summary["judge_settings"] = str(write_judge_settings(store.path, cfg.judge, check_metrics(cfg.metrics)))
        if not cfg.swap:
            summary["outputs"] = write_model_outputs(out, m, p["answers"], results, check_metrics(cfg.metrics))
        summaries[m] = summary
    total = {"models": summaries, "seconds": round(time.perf_counter() - t0, 2)}
    if len(summaries) == 1:
        total.update(next(iter(summaries.values())))
    log(f"[score] done: {json.dumps(total, default=str)[:2000]}")
    return total
