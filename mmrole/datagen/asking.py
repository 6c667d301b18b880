"""Asking the teacher: each request is an :class:`Item` (stage, cache key, what it is about); ``ask`` answers from
the per-item cache where it can and sends the rest to an executor: :class:`LocalExecutor` (asyncio in this process)
or the Ray Data one in :mod:`mmrole.ray_datagen`. Successful replies are cached, so a rerun asks only for what is
missing or changed; every call and failure is counted in the run's ledger."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional, Protocol

from .cache import TeacherCache, item_key
from .config import GenerateConfig, TeacherConfig
from .ledger import RunLedger
from .teacher import TeacherClient, TeacherRequest, TeacherResult
from .templates import GenTemplates


class GenerateError(RuntimeError):
    """The run cannot start (bad output folder, no images); the message says what to fix."""


class Executor(Protocol):
    def run(self, stage: str, requests: list[TeacherRequest]) -> list[TeacherResult]: ...


class LocalExecutor:
    """Teacher calls from this process, ``teacher.max_concurrency`` in flight."""

    def __init__(self, teacher: TeacherConfig):
        self.client = TeacherClient(teacher)

    def run(self, stage: str, requests: list[TeacherRequest]) -> list[TeacherResult]:
        return self.client.call_many(requests)


@dataclass
class Item:
    """One teacher request with what it is about (for gates and reject records)."""

    stage: str  # the template stage
    ledger_stage: str  # the counted stage
    key: str
    request: TeacherRequest
    character: str = ""
    image: str = ""
    dtype: str = ""
    context: dict = field(default_factory=dict)


def with_image(messages: list, data_url: Optional[str]) -> list:
    if not data_url:
        return messages
    system, user = messages
    return [
        system,
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": user["content"]},
            ],
        },
    ]


class TeacherAsker:
    """Builds the items of a stage and gets their results (cache first), for the teacher or the judge teacher."""

    def __init__(
        self,
        cfg: GenerateConfig,
        templates: GenTemplates,
        cache: TeacherCache,
        ledger: RunLedger,
        executor_factory: Optional[Callable[[TeacherConfig], Executor]] = None,
        progress: Callable[[str], None] = lambda s: None,
    ):
        self.cfg = cfg
        self.templates = templates
        self.cache = cache
        self.ledger = ledger
        self.executor_factory = executor_factory or LocalExecutor
        self.progress = progress
        self.judge_teacher = cfg.judge.teacher or cfg.teacher
        self._executors: dict[str, Executor] = {}

    def _executor(self, teacher: TeacherConfig) -> Executor:
        if teacher.identity not in self._executors:
            self._executors[teacher.identity] = self.executor_factory(teacher)
        return self._executors[teacher.identity]

    def item(self, stage: str, ledger_stage: str, inputs: dict, fields: dict, image_url=None, variant=0, **ctx) -> Item:
        prompt = self.templates[stage]
        teacher = self.judge_teacher if stage == "judge_dialogue" else self.cfg.teacher
        key = item_key(stage, {**inputs, "variant": variant}, teacher.identity, prompt.digest)
        messages = with_image(prompt.render(**fields), image_url if self.cfg.teacher.send_images else None)
        req = TeacherRequest(key, messages, stage, prompt.schema, seed_offset=variant)
        return Item(stage, ledger_stage, key, req, **ctx)

    def ask(self, items: list[Item], who: str = "teacher") -> dict[str, TeacherResult]:
        """Results per item key: from the cache, else from the teacher (successful replies are cached)."""
        teacher = self.judge_teacher if who == "judge" else self.cfg.teacher
        self.ledger.count(who)
        results: dict[str, TeacherResult] = {}
        todo: list[Item] = []
        for it in items:
            hit = self.cache.get(it.stage, it.key)
            if hit is not None:
                results[it.key] = TeacherResult(key=it.key, reply=hit.get("reply"), text=hit.get("text", ""))
                self.ledger.count(who, cache_hits=1)
            else:
                todo.append(it)
        if todo:
            self.progress(f"{todo[0].ledger_stage}: {len(todo)} teacher requests ({len(items) - len(todo)} cached)")
            unique = {it.key: it for it in todo}
            got = self._executor(teacher).run(todo[0].ledger_stage, [it.request for it in unique.values()])
            for it, res in zip(unique.values(), got):
                self.ledger.count(
                    who,
                    requests=1,
                    http_attempts=res.http_attempts,
                    prompt_tokens=res.prompt_tokens,
                    completion_tokens=res.completion_tokens,
                )
                results[it.key] = res
                if res.ok:
                    self.cache.put(it.stage, it.key, {"reply": res.reply, "text": res.text})
        return results

    def failed(self, it: Item, res: TeacherResult) -> bool:
        """Record a request that gave no usable JSON; True when it failed."""
        if res.ok:
            return False
        self.ledger.reject(it.ledger_stage, res.error_code or "error", res.error, it.character, it.image, it.dtype)
        return True
