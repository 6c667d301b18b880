"""Reward-model training data from judge reviews.

Input: published-format review files (``<set>_reviews/<model>/<type>_test.json``: the test sample, the model's
answer in ``conversations[1].answer``, the ground truth in ``conversations[1].value`` and
``rm_review[metric] = {review, score: [A, B]}``). Output: the published ``RM_data`` format, one record per
(sample, model, metric)::

    {"id": ..., "system": <judge system message>,
     "conversations": [{"from": "user", "value": "Picture 1: <img>IMAGE</img>\\n<judge prompt>"},
                       {"from": "assistant", "value": <review ending in "[Scores]: (A, B)">}]}

The judge prompt is rendered with :mod:`mmrole.eval`'s template (the same wording the judge sees at scoring
time; pass the original ``RM_review.py`` as the template for the wording the published reviews were written for),
with Model A = the evaluated answer and Model B = the ground truth. ``system`` is an extra key beyond the
published format so the reward model can be trained with the system message it is used with.

Rows are rejected (with id and reason, never silently) when the review is missing/failed, or when its text
does not end with the score pair it records (the model would learn inconsistent outputs). The train/test split is
by sample id (hash), so the reviews of one sample for different models and metrics never straddle the split.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

_LAYOUT = re.compile(r"(?P<set>[^/]+)_reviews/(?P<model>[^/]+)/(?P<type>[^/]+)_test\.json$")


@dataclass
class RMBuildStats:
    files: int = 0
    records_in: int = 0  # review records read
    pairs_in: int = 0  # (record, metric) pairs seen
    out_train: int = 0
    out_test: int = 0
    rejected: list[dict] = field(default_factory=list)  # {file, id, metric, reason}

    @property
    def out(self) -> int:
        return self.out_train + self.out_test

    def by_reason(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for r in self.rejected:
            key = r["reason"].split(":")[0]
            c[key] = c.get(key, 0) + 1
        return c

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "records_in": self.records_in,
            "in": self.pairs_in,
            "out": self.out,
            "out_train": self.out_train,
            "out_test": self.out_test,
            "rejected": len(self.rejected),
            "rejected_by_reason": self.by_reason(),
        }


def find_review_files(root: str | Path) -> list[Path]:
    """Review files under ``root`` in the published layout (``*_reviews/<model>/<type>_test.json``)."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*_test.json") if _LAYOUT.search(p.as_posix()))


def file_labels(path: Path) -> tuple[str, str, str]:
    """(set name, model, dialogue type) from a published-layout path; fallbacks for other paths."""
    m = _LAYOUT.search(Path(path).as_posix())
    if m:
        return m.group("set"), m.group("model"), m.group("type")
    return "", Path(path).parent.name, Path(path).stem.replace("_test", "")


def in_test_split(sample_id: str, test_fraction: float, seed: int = 0) -> bool:
    """Deterministic split by sample id (stable across runs, machines and Python hash seeds)."""
    if test_fraction <= 0:
        return False
    h = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < test_fraction


def rm_record(rid: str, image: str, prompt: str, review: str, system: str = "") -> dict:
    """One record in the published RM_data format (plus ``system``)."""
    return {
        "id": rid,
        "system": system,
        "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{image}</img>\n{prompt}"},
            {"from": "assistant", "value": review},
        ],
    }


def records_from_reviews(
    path: str | Path, template=None, metrics: Optional[Sequence[str]] = None, stats: Optional[RMBuildStats] = None
) -> Iterable[tuple[str, dict]]:
    """(sample id, RM record) for every usable (record, metric) of one review file."""
    from mmrole.eval.contract import JudgeResult, request_for, rm_training_sample
    from mmrole.eval.formats import load_reviews_file
    from mmrole.eval.metrics import METRICS
    from mmrole.eval.parse import try_parse_scores
    from mmrole.eval.template_loader import load_judge_template

    template = template or load_judge_template()
    stats = stats if stats is not None else RMBuildStats()
    set_name, model, dtype = file_labels(Path(path))
    recs, load = load_reviews_file(path, set_name=set_name, dialogue_type=dtype)
    stats.files += 1
    stats.records_in += load.n_in
    for rid, reason in load.rejected:
        stats.rejected.append({"file": str(path), "id": rid, "metric": "", "reason": f"bad_record: {reason}"})
    for rec in recs:
        a = rec.answer
        for metric in metrics or METRICS:
            stats.pairs_in += 1
            entry = rec.reviews.get(metric)
            rej = {"file": str(path), "id": a.id, "metric": metric}
            if entry is None or entry.score is None:
                stats.rejected.append({**rej, "reason": f"no_score: {entry.error if entry else 'absent'}"})
                continue
            if not entry.review.strip():
                stats.rejected.append({**rej, "reason": "empty_review: the review text is empty"})
                continue
            parsed, why = try_parse_scores(entry.review)
            if parsed is None or tuple(parsed) != tuple(entry.score):
                stats.rejected.append(
                    {
                        **rej,
                        "reason": f"score_mismatch: review text gives {parsed or why}, record says {list(entry.score)}",
                    }
                )
                continue
            req = request_for(a, metric)
            result = JudgeResult(a.id, metric, True, *entry.score, review=entry.review.strip())
            s = rm_training_sample(req, result, template)
            rm_id = f"{model}/{s.id}" if model else s.id
            yield a.id, rm_record(rm_id, a.image, s.user_text, s.target, s.system)


def build_rm_data(
    review_paths: Sequence[str | Path],
    out_root: str | Path,
    test_fraction: float = 0.1,
    seed: int = 0,
    template=None,
    metrics: Optional[Sequence[str]] = None,
    shuffle: bool = True,
) -> RMBuildStats:
    """Write ``out_root/RM_data/train/rm_train.json`` (and ``test/rm_test.json`` when ``test_fraction > 0``)
    plus ``out_root/RM_data/rejects.jsonl`` and ``build_report.json``; returns the counts."""
    stats = RMBuildStats()
    train, test = [], []
    seen: set[str] = set()
    for path in review_paths:
        for sid, rec in records_from_reviews(path, template, metrics, stats):
            if rec["id"] in seen:
                stats.rejected.append(
                    {
                        "file": str(path),
                        "id": rec["id"],
                        "metric": "",
                        "reason": "duplicate: same model, sample and metric seen before",
                    }
                )
                continue
            seen.add(rec["id"])
            (test if in_test_split(sid, test_fraction, seed) else train).append(rec)
    if shuffle:  # files are grouped by model/type; mix them so shards and epochs see all kinds
        random.Random(seed).shuffle(train)
    out = Path(out_root) / "RM_data"
    stats.out_train, stats.out_test = len(train), len(test)
    _dump(out / "train" / "rm_train.json", train)
    if test_fraction > 0:
        _dump(out / "test" / "rm_test.json", test)
    with open(out / "rejects.jsonl", "w", encoding="utf-8") as f:
        for r in stats.rejected:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "build_report.json").write_text(json.dumps(stats.to_dict(), indent=2), encoding="utf-8")
    return stats


def _dump(path: Path, data: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- demo data


def synthetic_reviews(
    dataset_root: str | Path, out_eval_dir: str | Path, seed: int = 0, model: str = "demo-model"
) -> list[Path]:
    """Review files for a dataset's test split with made-up answers and scores (demo/CI only: real reward-model
    data comes from a real judge). The answer is the reference with its words shuffled; the review names the
    metric and ends with ``[Scores]: (A, B)``."""
    from mmrole.eval.metrics import METRICS

    root = Path(dataset_root)
    rng = random.Random(seed)
    written = []
    for f in sorted((root / "data" / "test").glob("*/*_test.json")):
        group, dtype = f.parent.name, f.name[: -len("_test.json")]
        set_name = "in-test" if group == "in-distribution" else "out-test"
        recs = json.loads(f.read_text(encoding="utf-8"))
        out = []
        for r in recs:
            ref = r["conversations"][1]["value"]
            words = ref.split()
            rng.shuffle(words)
            r = json.loads(json.dumps(r))
            r["conversations"][1]["answer"] = " ".join(words)
            reviews = {}
            for m in METRICS:
                a, b = rng.randint(3, 9), rng.randint(6, 10)
                better = "Model A" if a > b else "Model B" if b > a else "Neither model"
                reviews[m] = {
                    "review": f"On {m.lower()}, {better} does better in this exchange. [Scores]: ({a}, {b})",
                    "score": [float(a), float(b)],
                }
            r["rm_review"] = reviews
            out.append(r)
        p = Path(out_eval_dir) / f"{set_name}_reviews" / model / f"{dtype}_test.json"
        _dump(p, out)
        written.append(p)
    return written


def demo_rm_builder(dataset_root: str | Path, test_fraction: float = 0.25, seed: int = 0) -> dict:
    """``build_demo(..., rm_builder=demo_rm_builder)``: synthetic reviews of the demo test split -> RM_data."""
    root = Path(dataset_root)
    files = synthetic_reviews(root, root / "eval_synthetic", seed=seed)
    stats = build_rm_data(files, root, test_fraction=test_fraction, seed=seed)
    return {"rm_train": stats.out_train, "rm_test": stats.out_test, "rm_rejected": len(stats.rejected)}
