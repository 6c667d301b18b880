"""Reading stored conversations and their judgements for display (the judge page): ``<out>/converse/`` as
``mmrole eval converse`` wrote it. Pure: reads the JSON-lines stores, no model, no Ray.

A page shows the latest stored version of each turn (a rerun with another agent appends new versions) and, per agent
turn, the parsed scores of its judgements (failures shown as failures, never as scores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .store import JsonlStore, ResultsStore


class ConversationNotFound(KeyError):
    """No such model or conversation under the folder."""


def _models(root: Path) -> list[str]:
    d = root / "conversations"
    return sorted(p.stem for p in d.glob("*.jsonl")) if d.is_dir() else []


def _latest_turns(root: Path, model: str) -> dict[str, list[dict]]:
    """{conversation: its turns in order}: the latest record per position, up to the first failed turn."""
    by_conv: dict[str, dict[int, dict]] = {}
    for _, rec in JsonlStore(root / "conversations" / f"{model}.jsonl").read_records()[0]:
        by_conv.setdefault(str(rec.get("conv")), {})[int(rec.get("index", 0))] = rec
    out = {}
    for conv, recs in by_conv.items():
        turns = []
        for i in range(len(recs)):
            if i not in recs:
                break
            turns.append(recs[i])
            if recs[i].get("error"):
                break
        out[conv] = turns
    return out


def list_conversations(root: Union[str, Path]) -> list[dict]:
    """One entry per stored (model, conversation): agent turns, whether it ended on a failed turn."""
    root = Path(root)
    out = []
    for model in _models(root):
        for conv, turns in sorted(_latest_turns(root, model).items()):
            out.append(
                {
                    "model": model,
                    "conversation": conv,
                    "agent_turns": sum(t.get("speaker") == "agent" and not t.get("error") for t in turns),
                    "turns": len(turns),
                    "failed": next((t.get("error") for t in turns if t.get("error")), ""),
                }
            )
    return out


def _scores(path: Path) -> dict:
    if not path.exists():
        return {}
    out: dict = {}
    for (sid, metric), r in ResultsStore(path).load().items():
        out.setdefault(sid, {})[metric] = {
            "ok": r.ok,
            "score": r.score_a if r.ok else None,
            "error": r.error or "",
            "review": r.review,
        }
    return out


def _mean(entry: dict):
    xs = [v["score"] for v in entry.values() if v["ok"]]
    return sum(xs) / len(xs) if xs else None


def conversation_view(root: Union[str, Path], model: str, conversation: str) -> dict:
    """The turns of one stored conversation with each agent turn's per-metric scores and mean, and the
    whole-conversation scores; raises :class:`ConversationNotFound`."""
    root = Path(root)
    if model not in _models(root):  # only names found on disk: no path built from the request
        raise ConversationNotFound(f"no stored conversations of model {model!r}")
    turns = _latest_turns(root, model).get(conversation)
    if turns is None:
        raise ConversationNotFound(f"model {model!r} has no conversation {conversation!r}")
    per_turn = _scores(root / "judge_results" / f"{model}.turns.jsonl")
    whole = _scores(root / "judge_results" / f"{model}.conversation.jsonl").get(conversation, {})
    shown = []
    for t in turns:
        entry = {k: t.get(k) for k in ("index", "speaker", "name", "text", "error", "source", "agent_turn")}
        if t.get("speaker") == "agent" and not t.get("error"):
            s = per_turn.get(f"{conversation}#t{t.get('agent_turn')}", {})
            entry["scores"] = s
            entry["mean"] = _mean(s)
        shown.append(entry)
    return {
        "model": model,
        "conversation": conversation,
        "turns": shown,
        "conversation_scores": whole,
        "conversation_mean": _mean(whole),
    }
