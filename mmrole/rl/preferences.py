"""Preference pairs from judge scores (pure: no Ray, no torch): the job config of ``jobs/build_preferences.py``,
the per-row seeds of the sampled answers, the judge requests of each candidate, the choice of (chosen, rejected)
and the writer of the preference split.

A prompt (a prepared training sample) gets K sampled answers; each is scored against the ground truth (the
sample's ``target``) by the judge on the chosen metrics, and its score is the mean MMRole-Eval ratio A/B over
them. A candidate is scored only when every metric parsed: a failed judge reply is counted and recorded, never
scored as zero. The best and worst scored candidates make the pair; rows with fewer than two scored candidates,
ties, or too-long prompts are rejected with their reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from mmrole.config import ConfigError, load_config_file, path_field
from mmrole.data.records import Sample
from mmrole.eval.contract import JudgeRequest, JudgeResult
from mmrole.eval.job_config import AgentSettings, JudgeSettings, PoolSettings
from mmrole.eval.metrics import check_metrics
from mmrole.models.config import GenerationParams

PREFERENCE_SPLIT = "pref_train"
CANDIDATE_SEP = "#k"  # a candidate's judge id: <sample id>#k<index>
REASONS = ("too_long", "generation_failed", "judge_failed", "too_few_scored", "tie")


@dataclass
class PreferenceData:
    """The prompts: a prepared folder's split (the SFT samples), the first ``max_rows`` in manifest order."""

    prepared: str = path_field("input", default="")
    split: str = "train"
    max_rows: Optional[int] = None


@dataclass
class SamplingParams(GenerationParams):
    """How the K answers are sampled (GenerationParams with sampling on and a seed by default)."""

    max_new_tokens: int = 128
    do_sample: bool = True
    seed: Optional[int] = 0


@dataclass
class PreferenceJobConfig:
    """``jobs/build_preferences.py``: K sampled answers per prompt, judged, turned into (chosen, rejected) pairs."""

    agent: AgentSettings
    judge: JudgeSettings
    data: PreferenceData = field(default_factory=PreferenceData)
    out: str = path_field("output", default="outputs/preferences")  # a prepared folder: manifest + pref_train/
    samples_per_prompt: int = 4  # K answers sampled per prompt
    generation: SamplingParams = field(default_factory=SamplingParams)
    metrics: Optional[list[str]] = None  # judge metrics averaged into a candidate's score (default: all 8)
    min_margin: float = 0.0  # best - worst score must exceed this, else the row is a tie
    max_reject_ratio: float = 0.5  # the run is "ok" only if at most this share of prompts is rejected
    agent_pool: PoolSettings = field(default_factory=PoolSettings)  # batch_size = prompts per replica call
    judge_pool: PoolSettings = field(default_factory=PoolSettings)  # batch_size = judge requests per call
    ray_address: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        need(bool(self.data.prepared), "data.prepared", "is required (the output folder of `mmrole data prepare`)")
        need(self.data.max_rows is None or self.data.max_rows >= 1, "data.max_rows", "must be >= 1 or null")
        need(self.samples_per_prompt >= 2, "samples_per_prompt", "must be >= 2 (a pair needs two answers)")
        need(
            self.agent.kind == "local",
            "agent.kind",
            "preferences are sampled from a local agent (seeded per prompt); endpoint agents are not supported",
        )
        need(
            self.generation.do_sample,
            "generation.do_sample",
            "must be true: greedy decoding gives the same answer K times",
        )
        need(self.generation.seed is not None, "generation.seed", "is required (answers are seeded per prompt)")
        need(self.min_margin >= 0, "min_margin", "must be >= 0")
        need(0 <= self.max_reject_ratio <= 1, "max_reject_ratio", "must be in [0, 1]")
        try:
            check_metrics(self.metrics)
        except ValueError as e:
            raise ConfigError(f"metrics: {e}") from None

    @property
    def metric_list(self) -> list[str]:
        return list(check_metrics(self.metrics))


def load_preference_config(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> PreferenceJobConfig:
    """Read a preference-job YAML config and ``key=value`` overrides, build and validate."""
    return load_config_file(PreferenceJobConfig, path, overrides)


def row_seed(base_seed: int, sample_id: str) -> int:
    """The sampling seed of one prompt's K answers: a function of (seed, id) alone, so a rerun gives the same
    answers however Ray batches the rows."""
    h = hashlib.blake2b(f"{int(base_seed)}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % (2**31 - 1)


def candidate_id(sample_id: str, k: int) -> str:
    return f"{sample_id}{CANDIDATE_SEP}{k}"


def candidate_requests(sample: Sample, answers: list[str], errors: list[str], metrics: list[str]) -> list[JudgeRequest]:
    """One judge request per (generated candidate, metric): Model A = the candidate, Model B = the ground truth."""
    out = []
    for k, (answer, error) in enumerate(zip(answers, errors)):
        if error or not answer.strip():
            continue
        for m in metrics:
            out.append(
                JudgeRequest(
                    sample_id=candidate_id(sample.id, k),
                    metric=m,
                    question=sample.user_text,
                    answer=answer,
                    reference=sample.target,
                    image=sample.image,
                    role=sample.role,
                    other_role=sample.other_role,
                    script=sample.script,
                    dialogue_type=sample.dialogue_type,
                )
            )
    return out


@dataclass
class Candidate:
    k: int
    answer: str
    error: str = ""  # generation error ("" = generated)
    ratios: dict = field(default_factory=dict)  # metric -> A/B ratio, for the metrics that parsed
    judge_errors: dict = field(default_factory=dict)  # metric -> why the judge reply failed

    @property
    def generated(self) -> bool:
        return not self.error and bool(self.answer.strip())

    def score(self, metrics: list[str]) -> Optional[float]:
        """Mean ratio over ``metrics``; None unless every metric parsed."""
        if not self.generated or any(m not in self.ratios for m in metrics):
            return None
        return sum(self.ratios[m] for m in metrics) / len(metrics)


@dataclass
class RowOutcome:
    """A prompt's candidates and what became of it: a pair (``pair`` set) or a rejection reason."""

    sample: Sample
    candidates: list[Candidate]
    pair: Optional[dict] = None
    reason: str = ""
    detail: str = ""


def choose_pair(sample: Sample, candidates: list[Candidate], metrics: list[str], min_margin: float) -> RowOutcome:
    """The best and the worst scored candidate, or why there is no pair."""
    row = RowOutcome(sample, candidates)
    generated = [c for c in candidates if c.generated]
    if not generated:
        errors = [c.error for c in candidates if c.error]
        too_long = any("SampleTooLong" in e or "too long" in e.lower() for e in errors)
        row.reason = "too_long" if too_long else "generation_failed"
        row.detail = errors[0] if errors else "every answer was empty"
        return row
    scored = [(c.score(metrics), c) for c in generated]
    scored = [(s, c) for s, c in scored if s is not None]
    if len(scored) < 2:
        failed = sum(1 for c in generated if c.judge_errors)
        row.reason = "judge_failed" if failed == len(generated) else "too_few_scored"
        first = next((c.judge_errors for c in generated if c.judge_errors), {})
        row.detail = (
            f"{len(scored)} of {len(candidates)} candidates scored ({failed} with failed judge replies, "
            f"{len(candidates) - len(generated)} not generated)"
            + (f"; e.g. {next(iter(first.values()))}" if first else "")
        )
        return row
    best_s, best = max(scored, key=lambda sc: (sc[0], -sc[1].k))
    worst_s, worst = min(scored, key=lambda sc: (sc[0], -sc[1].k))
    if best_s - worst_s <= min_margin or best.answer.strip() == worst.answer.strip():
        row.reason = "tie"
        row.detail = f"best {best_s:.4f} - worst {worst_s:.4f} <= min_margin {min_margin}"
        return row
    row.pair = {
        "chosen": best.answer,
        "rejected": worst.answer,
        "chosen_score": best_s,
        "rejected_score": worst_s,
        "chosen_k": best.k,
        "rejected_k": worst.k,
        "scored": len(scored),
    }
    return row


def attach_results(candidates: dict[str, list[Candidate]], results: list[JudgeResult]) -> None:
    """Put each judge result on its candidate (by ``<id>#k<index>``)."""
    for r in results:
        sid, _, k = r.sample_id.rpartition(CANDIDATE_SEP)
        c = candidates[sid][int(k)]
        if r.ok:
            c.ratios[r.metric] = r.ratio
        else:
            c.judge_errors[r.metric] = r.error or "failed"


PAIR_COLUMNS = ("rejected", "reference", "chosen_score", "rejected_score", "chosen_k", "rejected_k")


def pair_row(row: RowOutcome) -> dict:
    """The Parquet row of a pair: the prompt's Sample fields with ``target`` = the chosen reply, plus the rejected
    reply, the ground truth (``reference``) and the scores."""
    p = row.pair
    rec = row.sample.to_row()
    rec.update(
        target=p["chosen"],
        rejected=p["rejected"],
        reference=row.sample.target,
        chosen_score=float(p["chosen_score"]),
        rejected_score=float(p["rejected_score"]),
        chosen_k=int(p["chosen_k"]),
        rejected_k=int(p["rejected_k"]),
    )
    return rec


def summarize(rows: list[RowOutcome], metrics: list[str], judge_results: list[JudgeResult], cfg) -> dict:
    """Counts in/out/rejected (by reason), candidates and judge replies, and the verdict."""
    reasons = Counter(r.reason for r in rows if r.pair is None)
    cands = [c for r in rows for c in r.candidates]
    n_in, n_out = len(rows), sum(1 for r in rows if r.pair is not None)
    rejected = n_in - n_out
    failures = Counter((r.error or "failed").split(":")[0] for r in judge_results if not r.ok)
    ok = n_out > 0 and rejected <= cfg.max_reject_ratio * n_in
    error = None
    if n_out == 0:
        error = "no preference pair was made (see rejected_by_reason)"
    elif not ok:
        error = f"{rejected} of {n_in} prompts rejected, more than max_reject_ratio={cfg.max_reject_ratio}"
    pairs = [r.pair for r in rows if r.pair is not None]
    return {
        "ok": ok,
        "error": error,
        "in": n_in,
        "out": n_out,
        "rejected": rejected,
        "rejected_by_reason": {k: reasons[k] for k in REASONS if reasons[k]},
        "candidates": {
            "sampled": len(cands),
            "generated": sum(c.generated for c in cands),
            "generation_failed": sum(not c.generated for c in cands),
            "scored": sum(c.score(metrics) is not None for c in cands),
            "with_failed_judge_replies": sum(bool(c.judge_errors) for c in cands),
        },
        "judge": {
            "requests": len(judge_results),
            "parsed": sum(r.ok for r in judge_results),
            "failed": sum(not r.ok for r in judge_results),
            "failure_reasons": dict(failures),
        },
        "mean_chosen_score": sum(p["chosen_score"] for p in pairs) / len(pairs) if pairs else None,
        "mean_rejected_score": sum(p["rejected_score"] for p in pairs) / len(pairs) if pairs else None,
        "metrics": metrics,
        "samples_per_prompt": cfg.samples_per_prompt,
    }


def write_preferences(out: Path, images_root: str, rows: list[RowOutcome], summary: dict, config: dict) -> dict:
    """Write the preference folder (a prepared folder whose ``pref_train`` split DPO reads) into a temporary
    directory that replaces ``out`` only when complete: manifest.json, pref_train/part-00000.parquet, pairs.jsonl,
    candidates.jsonl (every answer and its per-metric ratios), rejects.jsonl and summary.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmrole.data.prepared import FORMAT, MANIFEST, sample_schema

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        schema = sample_schema()
        for name, tp in (
            ("rejected", pa.string()),
            ("reference", pa.string()),
            ("chosen_score", pa.float64()),
            ("rejected_score", pa.float64()),
            ("chosen_k", pa.int64()),
            ("rejected_k", pa.int64()),
        ):
            schema = schema.append(pa.field(name, tp))
        recs = [pair_row(r) for r in rows if r.pair is not None]
        rel = f"{PREFERENCE_SPLIT}/part-00000.parquet"
        (tmp / PREFERENCE_SPLIT).mkdir()
        table = pa.Table.from_pylist(recs, schema=schema)
        pq.write_table(table, tmp / rel, compression="zstd")
        digest = hashlib.sha256((tmp / rel).read_bytes()).hexdigest()
        manifest = {
            "format": FORMAT,
            "images_root": str(images_root),
            "embed_images": False,
            "source": config.get("data", {}),
            "splits": {PREFERENCE_SPLIT: {"files": [rel], "rows": len(recs), "sha256": {rel: digest}}},
            "counts": {PREFERENCE_SPLIT: {k: summary[k] for k in ("in", "out", "rejected", "rejected_by_reason")}},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        with open(tmp / "pairs.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                if r.pair is not None:
                    f.write(json.dumps({"id": r.sample.id, **r.pair}, ensure_ascii=False) + "\n")
        with open(tmp / "candidates.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                for c in r.candidates:
                    f.write(json.dumps({"id": r.sample.id, **asdict(c)}, ensure_ascii=False) + "\n")
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                if r.pair is None:
                    f.write(json.dumps({"id": r.sample.id, "reason": r.reason, "detail": r.detail}) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary | {"config": config}, indent=2, ensure_ascii=False))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
