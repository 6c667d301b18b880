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


def _pool_args(pool: PoolSettings) -> dict:
    """map_batches arguments of an actor pool whose replicas are restarted, and blocks retried, on failure."""
    import ray

    c = pool.concurrency_arg()
    size = dict(size=c) if isinstance(c, int) else dict(min_size=c[0], max_size=c[1])
    return dict(
        compute=ray.data.ActorPoolStrategy(**size),
        batch_size=pool.batch_size,
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
        max_restarts=pool.max_restarts,
        max_task_retries=-1,
    )


# ------------------------------------------------------------------------------------------------ answering
class AnswerWorker:
    """A replica of the agent: a batch of Sample rows -> their answers (batched generation)."""

    def __init__(self, agent: dict, generation: dict, images_root: str):
        from mmrole.models import GenerationParams, VLMConfig, build_vlm

        self.vlm = build_vlm(VLMConfig.from_dict(agent))
        self.params = GenerationParams.from_dict(generation)
        self.images_root = images_root

    def __call__(self, batch: dict) -> dict:
        from mmrole.data.images import ImageError, load_image

        samples, images, ids, errors = [], [], [], []
        for row in _rows(batch):
            s = Sample.from_row(row)
            ids.append(s.id)
            try:
                images.append(load_image(self.images_root, s.image))
                samples.append(s)
                errors.append("")
            except ImageError as e:
                errors.append(str(e))
        answers = iter(self.vlm.generate(samples, images, self.params) if samples else [])
        out = [next(answers) if not err else "" for err in errors]
        return {
            "id": np.array(ids, dtype=object),
            "answer": np.array(out, dtype=object),
            "error": np.array(errors, dtype=object),
        }


class JsonlStore:
    """Append-only ``{id, ...}`` JSON lines; the first record of an id wins; a torn last line is ignored."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        if not self.path.exists():
            return out
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash; that id is answered again
            out.setdefault(rec["id"], rec)
        return out

    def append(self, recs: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run_generate(cfg: GenerateJobConfig, log: Log = _log, stop_after: Optional[int] = None) -> dict:
    """Answer every sample of ``cfg.split`` in ``cfg.sets`` that the store lacks; write the answers files."""
    import ray

    from mmrole.data.prepared import images_root as prepared_images_root
    from mmrole.data.prepared import iter_samples
    from mmrole.eval.formats import answer_record_dict, write_answers_file

    out = Path(cfg.out)
    store = JsonlStore(out / "answer_store" / f"{cfg.model_name}.jsonl")
    done = store.load()
    wanted_groups = {g for g, s in TEST_SETS.items() if s in cfg.sets}
    samples = [s for s in iter_samples(cfg.data, cfg.split) if s.group in wanted_groups]
    if cfg.max_samples is not None:
        samples = samples[: cfg.max_samples]
    todo_ids = {s.id for s in samples} - set(done)
    log(
        f"[answers] {len(samples)} samples in {cfg.sets}; {len(samples) - len(todo_ids)} already answered, "
        f"{len(todo_ids)} to do"
    )
    t0 = time.perf_counter()
    n_new = 0
    if todo_ids:
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
            **_pool_args(cfg.pool),
        )
        written: set[str] = set()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            recs = [
                {"id": str(i), "answer": str(a), "error": str(e)}
                for i, a, e in zip(batch["id"], batch["answer"], batch["error"])
                if str(i) not in written
            ]
            store.append(recs)
            written.update(r["id"] for r in recs)
            n_new += len(recs)
            log(f"[answers] {len(samples) - len(todo_ids) + n_new}/{len(samples)} answered")
            if stop_after is not None and n_new >= stop_after:
                log("[answers] stopping early (stop_after)")
                return {"stopped": True, "answered": n_new}
    done = store.load()
    by_file: dict[tuple[str, str], list[dict]] = defaultdict(list)
    errors = Counter()
    for s in samples:
        rec = done[s.id]
        if rec.get("error"):
            errors["image"] += 1
        by_file[(TEST_SETS[s.group], s.dialogue_type)].append(answer_record_dict(s, rec["answer"]))
    files_written = []
    for (set_name, dtype), recs in sorted(by_file.items()):
        path = out / f"{set_name}_answers" / cfg.model_name / f"{dtype}_test.json"
        write_answers_file(path, recs)
        files_written.append(str(path))
    empty = sum(1 for s in samples if not done[s.id]["answer"].strip())
    summary = {
        "samples": len(samples),
        "answered_now": n_new,
        "empty_answers": empty,
        "errors": dict(errors),
        "seconds": round(time.perf_counter() - t0, 2),
        "files": files_written,
    }
    log(f"[answers] done: {json.dumps(summary)}")
    return summary


# ------------------------------------------------------------------------------------------------- scoring
def build_judge(settings: JudgeSettings, images_root: str):
    """The judge a replica uses, from its settings."""
    from mmrole.eval.template import load_judge_template

    template = load_judge_template(settings.template)
    if settings.kind == "local":
        from mmrole.eval.judges import VLMJudge
        from mmrole.models import build_vlm

        vlm = build_vlm(settings.model)
        return VLMJudge(
            vlm,
            settings.generation,
            max_retries=settings.max_retries,
            template=template,
            images_root=images_root,
            name=f"local:{Path(settings.model.model_path).name}",
        )
    if settings.kind == "openai":
        from mmrole.eval.judges import OpenAIJudge

        oc = settings.openai
        if oc.images_root is None:
            oc.images_root = images_root
        return OpenAIJudge(oc, template)
    from mmrole.eval.serve_judge import ServeJudge  # kind == "serve"

    return ServeJudge(settings.serve_url, token=os.environ.get(settings.serve_token_env), images_root=images_root)


class JudgeWorker:
    """A replica of the judge: a batch of serialized JudgeRequests -> serialized JudgeResults."""

    def __init__(self, judge: dict, images_root: str):
        from mmrole.config import build_dataclass

        self.judge = build_judge(build_dataclass(JudgeSettings, judge), images_root)

    def __call__(self, batch: dict) -> dict:
        from mmrole.eval.contract import JudgeRequest

        reqs = [JudgeRequest.from_dict(json.loads(r)) for r in batch["request"]]
        results = self.judge.score_batch(reqs)
        return {"result": np.array([json.dumps(r.to_dict(), ensure_ascii=False) for r in results], dtype=object)}


def run_score(
    cfg: ScoreJobConfig,
    log: Log = _log,
    stop_after: Optional[int] = None,
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict:
    """Score every (sample, metric) the store lacks through a pool of judge replicas; then write the reviews,
    results CSVs and the report. ``stop_after`` stops after that many new results (tests of resume)."""
    import ray

    from mmrole.eval.contract import JudgeResult, expand_requests
    from mmrole.eval.metrics import check_metrics
    from mmrole.eval.pipeline import load_answers_dir, write_model_outputs
    from mmrole.eval.store import ResultsStore

    out = Path(cfg.out or cfg.eval_dir)
    answers, stats = load_answers_dir(cfg.eval_dir, cfg.model_name)
    for st in stats:
        if st.rejected:
            log(f"[score] {st.summary()}")
    empty = [a for a in answers if not a.answer.strip()]
    if empty:  # as in the original: reported and excluded
        log(f"[score] {len(empty)} empty answers excluded: {[a.id for a in empty][:10]}")
    answers = [a for a in answers if a.answer.strip()]
    requests = expand_requests(answers, cfg.metrics, swapped=cfg.swap)
    suffix = ".swapped" if cfg.swap else ""
    store = ResultsStore(out / "judge_results" / f"{cfg.model_name}{suffix}.jsonl")
    todo = store.pending(requests, retry_failed=cfg.retry_failed)
    log(
        f"[score] {len(requests)} judge requests ({len(answers)} answers x metrics); "
        f"{len(requests) - len(todo)} already scored, {len(todo)} to do"
    )
    t0 = time.perf_counter()
    n_new = n_ok = 0
    if todo:
        # One block per judge batch, in request order: a sample's metric requests stay in one batch, where the
        # judge prefills their shared prompt prefix once (VLM.generate's shared-prefix path).
        import pyarrow as pa

        bs = max(1, cfg.pool.batch_size)
        encoded = [json.dumps(r.to_dict(), ensure_ascii=False) for r in todo]
        ds = ray.data.from_arrow([pa.table({"request": encoded[i : i + bs]}) for i in range(0, len(encoded), bs)])
        ds = ds.map_batches(
            JudgeWorker,
            fn_constructor_kwargs=dict(judge=asdict(cfg.judge), images_root=cfg.images_root),
            **_pool_args(cfg.pool),
        )
        expected = {r.key for r in todo}
        written: set = set()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            results = [JudgeResult.from_dict(json.loads(x)) for x in batch["result"]]
            fresh = [r for r in results if r.key in expected and r.key not in written]
            store.append(fresh)
            written.update(r.key for r in fresh)
            n_new += len(fresh)
            n_ok += sum(r.ok for r in fresh)
            log(f"[score] {len(requests) - len(todo) + n_new}/{len(requests)} scored ({n_ok} parsed)")
            if on_batch:
                on_batch(n_new)
            if stop_after is not None and n_new >= stop_after:
                log("[score] stopping early (stop_after)")
                return {"stopped": True, "scored": n_new}
    audit = store.audit({r.key for r in requests})
    if not audit.complete:
        raise RuntimeError(f"scoring incomplete: {audit.to_dict()}")
    results = store.load()
    summary = {
        "requests": len(requests),
        "scored_now": n_new,
        "parsed": sum(r.ok for r in results.values()),
        "failed": sum(not r.ok for r in results.values()),
        "empty_answers_excluded": len(empty),
        "seconds": round(time.perf_counter() - t0, 2),
        "store": str(store.path),
    }
    if not cfg.swap:
        summary["outputs"] = write_model_outputs(out, cfg.model_name, answers, results, check_metrics(cfg.metrics))
    log(f"[score] done: {json.dumps(summary, default=str)[:2000]}")
    return summary
