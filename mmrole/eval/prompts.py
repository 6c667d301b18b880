"""Dry run of a scoring run: every judge request it would send, without a judge, with a token estimate.

One JSON line per (answered sample, metric): ``{model, set, type, id, metric, system, prompt, image}``, so users
inspect the exact wording and budget an API judge before paying for it; tests compare it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO, Union

from .contract import build_judge_sample, expand_requests
from .layout import discover
from .metrics import check_metrics
from .pipeline import load_answers_dir
from .template import JudgeTemplate

_WIDE = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uff00-\uffef]")  # CJK: about one token per character


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate: about 4 characters per token for Latin text, one per CJK character."""
    wide = len(_WIDE.findall(text))
    return wide + (len(text) - wide + 3) // 4


@dataclass
class PromptStats:
    """Per model: answers, requests written, empty answers skipped, prompt tokens (system + prompt, text only)."""

    model: str
    n_answers: int = 0
    n_empty: int = 0
    n_requests: int = 0
    prompt_tokens: int = 0
    rejected: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def write_prompts(
    eval_dir: Union[str, Path],
    template: JudgeTemplate,
    out: TextIO,
    models: Optional[Sequence[str]] = None,
    metrics: Optional[Sequence[str]] = None,
    count_tokens: Callable[[str], int] = estimate_tokens,
) -> list[PromptStats]:
    """Write the judge requests of every answered sample of ``models`` (default: all under ``eval_dir``)."""
    metrics = check_metrics(metrics)
    found = sorted({f.model for f in discover(eval_dir, "answers", "json")})
    models = list(models) if models else found
    stats = []
    for model in models:
        answers, loads = load_answers_dir(eval_dir, model)
        st = PromptStats(model, n_answers=len(answers))
        st.rejected = [f"{ls.path}: {rid}: {why}" for ls in loads for rid, why in ls.rejected]
        answered = [a for a in answers if a.answer.strip()]
        st.n_empty = len(answers) - len(answered)
        for req in expand_requests(answered, metrics):
            s = build_judge_sample(req, template)
            line = {
                "model": model,
                "set": req.set_name,
                "type": req.dialogue_type,
                "id": req.sample_id,
                "metric": req.metric,
                "system": s.system,
                "prompt": s.user_text,
                "image": req.image,
            }
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            st.n_requests += 1
            st.prompt_tokens += count_tokens(s.system) + count_tokens(s.user_text)
        stats.append(st)
    return stats


def hf_token_counter(tokenizer_path: str) -> Callable[[str], int]:
    """Exact counts with a local Hugging Face tokenizer (e.g. the judge's); no remote code."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=False)
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
