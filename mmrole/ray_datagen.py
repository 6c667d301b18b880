"""Ray glue of ``mmrole data generate``: each teacher stage as a Ray Data pipeline over a pool of teacher actors.

Concurrency to the teacher is bounded in all: ``ray_actors`` actors, each with ``teacher.max_concurrency /
ray_actors`` requests in flight. Retries with backoff on 429/5xx happen inside the actors
(:func:`mmrole.eval.openai_judge.post_with_retries`); an actor lost with its node is restarted and its block retried.
The API key is read by the actors from the environment they inherit (the driver's on an embedded Ray, the job's
runtime environment on a cluster), never shipped in task arguments. The cache stays on the driver (:class:`mmrole.datagen.pipeline.DataGenerator`): only missing items reach Ray, so
the same run works on an embedded Ray or a cluster without shared storage.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from mmrole.datagen.config import TeacherConfig
from mmrole.datagen.teacher import TeacherClient, TeacherRequest, TeacherResult


class TeacherWorker:
    """A Ray Data actor: a batch of serialised requests -> their results (async, bounded concurrency)."""

    def __init__(self, teacher: dict, max_concurrency: int):
        from mmrole.config import build_dataclass

        self.client = TeacherClient(build_dataclass(TeacherConfig, teacher), max_concurrency=max_concurrency)

    def __call__(self, batch: dict) -> dict:
        reqs = [TeacherRequest(**json.loads(str(x))) for x in batch["request"]]
        results = self.client.call_many(reqs)
        return {
            "key": [r.key for r in results],
            "result": [json.dumps(r.to_dict(), ensure_ascii=False) for r in results],
        }


class RayExecutor:
    """Runs a stage's teacher requests as ``from_items -> map_batches(TeacherWorker)`` (actor pool)."""

    def __init__(self, teacher: TeacherConfig, ray_actors: int = 2, num_cpus_per_actor: float = 0.25):
        self.teacher = teacher
        self.ray_actors = ray_actors
        self.num_cpus = num_cpus_per_actor  # the actors mostly wait on the network
        TeacherClient(teacher)  # fail early on a missing API key, on the driver

    def run(self, stage: str, requests: list[TeacherRequest]) -> list[TeacherResult]:
        import ray

        if not requests:
            return []
        t = self.teacher
        actors = max(1, min(self.ray_actors, len(requests)))
        per_actor = max(1, t.max_concurrency // actors)
        rows = [{"key": r.key, "request": json.dumps(asdict(r), ensure_ascii=False)} for r in requests]
        blocks = max(1, min(len(rows) // per_actor, 256))
        ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            TeacherWorker,
            fn_constructor_kwargs=dict(teacher=asdict(t), max_concurrency=per_actor),
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=per_actor,
            num_cpus=self.num_cpus,  # a lost actor is restarted and its block retried (Ray Data's defaults)
        )
        got: dict[str, TeacherResult] = {}
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k, r in zip(batch["key"], batch["result"]):
                got[str(k)] = TeacherResult(**json.loads(str(r)))
        missing = [r.key for r in requests if r.key not in got]
        for k in missing:  # never silently dropped: a request Ray lost is a failed request
            got[k] = TeacherResult(key=k, error_code="lost", error="no result came back from the Ray pipeline")
        return [got[r.key] for r in requests]
