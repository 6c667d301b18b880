"""Ray glue of ``jobs/build_preferences.py``: K sampled answers per training prompt (Ray Data over a pool of agent
replicas), scored against the ground truth by the judge through the evaluation's scoring pipeline
(:func:`mmrole.ray_eval.judge_dataset`: any judge the eval accepts), then paired and written by the pure core
:mod:`mmrole.rl.preferences`.

Each prompt's K answers come from one generation call seeded by (``generation.seed``, sample id)
(:func:`~mmrole.rl.preferences.row_seed`), so a rerun gives the same answers however Ray Data batches the rows;
the K copies of one prompt share their prefill (the VLM's shared-prefix decoding). Results come back in any order
and are put in manifest order before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from mmrole.eval.contract import JudgeResult
from mmrole.ray_eval import AnswerWorker, _log, _rows, judge_dataset, pool_args, progress_bar
from mmrole.rl.preferences import (
    Candidate,
    PreferenceJobConfig,
    attach_results,
    candidate_requests,
    choose_pair,
    row_seed,
    summarize,
    write_preferences,
)

Log = Callable[[str], None]


class CandidateWorker(AnswerWorker):
    """An agent replica: a batch of Sample rows -> K sampled answers each (JSON lists), or per-answer errors (an
    unreadable image, a prompt too long for the model): one bad prompt fails alone, recorded."""

    def __init__(self, agent: dict, generation: dict, images_root: str, k: int):
        super().__init__(agent, generation, images_root)
        self.k = int(k)

    def _sample(self, sample) -> tuple[list[str], list[str]]:
        from mmrole.data.images import ImageError, load_image

        try:
            image = load_image(self.images_root, sample.image)
        except ImageError as e:
            return [""] * self.k, [f"image: {e}"] * self.k
        (enc,) = self.vlm.encode_prompts([sample], [image], self.params)
        if isinstance(enc, Exception):
            return [""] * self.k, [f"prompt: {type(enc).__name__}: {enc}"] * self.k
        params = dataclasses.replace(self.params, seed=row_seed(self.params.seed, sample.id))
        return self.vlm.generate_encoded([enc] * self.k, params), [""] * self.k

    def __call__(self, batch: dict) -> dict:
        from mmrole.data.records import Sample

        samples = [Sample.from_row(row) for row in _rows(batch)]
        answers, errors = [], []
        for s in samples:
            a, e = self._sample(s)
            answers.append(json.dumps(a, ensure_ascii=False))
            errors.append(json.dumps(e, ensure_ascii=False))
        return {
            "id": np.array([s.id for s in samples], dtype=object),
            "answers": np.array(answers, dtype=object),
            "errors": np.array(errors, dtype=object),
        }


def sample_candidates(cfg: PreferenceJobConfig, samples: list, images_root: str, log: Log = _log) -> dict:
    """id -> (answers, errors) for every sample (Ray Data over the agent pool)."""
    import ray

    rows = [s.to_row() for s in samples]
    bs = max(1, cfg.agent_pool.batch_size)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(-(-len(rows) // bs), 256)))
    ds = ds.map_batches(
        CandidateWorker,
        fn_constructor_kwargs=dict(
            agent=asdict(cfg.agent),
            generation=asdict(cfg.generation),
            images_root=images_root,
            k=cfg.samples_per_prompt,
        ),
        **pool_args(cfg.agent_pool),
    )
    out: dict[str, tuple[list[str], list[str]]] = {}
    bar = progress_bar(len(rows), "sampling answers", cfg.progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i, a, e in zip(batch["id"], batch["answers"], batch["errors"]):
                out[str(i)] = (json.loads(a), json.loads(e))
            if bar is not None:
                bar.update(len(batch["id"]))
            else:
                log(f"[preferences] {len(out)}/{len(rows)} prompts sampled")
    finally:
        if bar is not None:
            bar.close()
    missing = [s.id for s in samples if s.id not in out]
    if missing:
        raise RuntimeError(f"sampling returned no answers for {len(missing)} prompt(s), e.g. {missing[:3]}")
    return out


def score_candidates(cfg: PreferenceJobConfig, requests: list, images_root: str, log: Log = _log) -> list[JudgeResult]:
    """Every judge request scored once (a key delivered twice by a retried block is kept once)."""
    if not requests:
        return []
    ds = judge_dataset(requests, ["candidates"] * len(requests), cfg.judge, images_root, cfg.judge_pool)
    results: dict = {}
    bar = progress_bar(len(requests), "judging", cfg.progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            fresh = [JudgeResult.from_dict(json.loads(x)) for x in batch["result"]]
            for r in fresh:
                results.setdefault(r.key, r)
            if bar is not None:
                bar.update(len(fresh))
            else:
                log(f"[preferences] {len(results)}/{len(requests)} judged")
    finally:
        if bar is not None:
            bar.close()
    missing = [r.key for r in requests if r.key not in results]
    if missing:
        raise RuntimeError(f"judging returned no result for {len(missing)} request(s), e.g. {missing[:3]}")
    return [results[r.key] for r in requests]


def run_preferences(cfg: PreferenceJobConfig, log: Log = _log, start_ray: Optional[Callable[[], None]] = None) -> dict:
    """Sample, judge, pair and write (see the module docstring); returns the summary (also ``out/summary.json``)."""
    from mmrole.data.prepared import images_root as prepared_images_root
    from mmrole.data.prepared import iter_samples

    t0 = time.perf_counter()
    samples = []
    seen: set[str] = set()
    for s in iter_samples(cfg.data.prepared, cfg.data.split):
        if cfg.data.max_rows is not None and len(samples) >= cfg.data.max_rows:
            break
        if s.id in seen:
            raise ValueError(f"{cfg.data.prepared} [{cfg.data.split}]: duplicate sample id {s.id!r}")
        seen.add(s.id)
        samples.append(s)
    if not samples:
        raise ValueError(f"{cfg.data.prepared} [{cfg.data.split}]: no samples")
    images_root = str(prepared_images_root(cfg.data.prepared))
    metrics = cfg.metric_list
    log(
        f"[preferences] {len(samples)} prompts x {cfg.samples_per_prompt} answers, judged on {len(metrics)} "
        f"metric(s) by a {cfg.judge.kind} judge"
    )
    if cfg.judge.kind == "openai":  # a missing key fails here, naming it, not in every replica's constructor
        from mmrole.eval.openai_judge import OpenAIJudge

        OpenAIJudge(cfg.judge.openai)
    if start_ray is not None:
        start_ray()
    t_sample = time.perf_counter()
    answers = sample_candidates(cfg, samples, images_root, log)
    t_judge = time.perf_counter()
    requests = [req for s in samples for req in candidate_requests(s, answers[s.id][0], answers[s.id][1], metrics)]
    results = score_candidates(cfg, requests, images_root, log)
    t_pair = time.perf_counter()
    candidates = {s.id: [Candidate(k, a, e) for k, (a, e) in enumerate(zip(*answers[s.id]))] for s in samples}
    attach_results(candidates, results)
    rows = [choose_pair(s, candidates[s.id], metrics, cfg.min_margin) for s in samples]
    summary = summarize(rows, metrics, results, cfg)
    summary["seconds"] = {
        "sampling": round(t_judge - t_sample, 2),
        "judging": round(t_pair - t_judge, 2),
        "total": round(time.perf_counter() - t0, 2),
    }
    summary["out_dir"] = str(Path(cfg.out))
    write_preferences(Path(cfg.out), images_root, rows, summary, asdict(cfg))
    log(
        f"[preferences] prompts: in {summary['in']}, out {summary['out']} pairs, rejected {summary['rejected']} "
        f"{summary['rejected_by_reason'] or ''}; judge replies parsed {summary['judge']['parsed']}/"
        f"{summary['judge']['requests']} {summary['judge']['failure_reasons'] or ''}".rstrip()
    )
    if summary["error"]:
        log(f"[preferences] FAILED: {summary['error']}")
    log(f"[preferences] wrote {cfg.out} (pref_train split, pairs.jsonl, candidates.jsonl, rejects.jsonl, summary.json)")
    return summary
