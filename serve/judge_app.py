"""Ray Serve app of the reward-model judge: ``POST /v1/score`` scores one answer against its reference.

Request: ``question`` (the rendered role-play question) or ``sample`` (role-play fields, rendered with the training
template), ``image`` (data: URL), ``answer`` (model under test, "Model A"), ``reference`` (ground truth,
"Model B"), ``metrics`` (default: all 8), optional ``sample_id``, ``role``, ``other_role``, ``script``,
``swapped``, ``max_retries``. The request fans out into one judge call per metric; those calls join the batches
of every other request. Each reply is parsed and re-asked exactly as the offline ``VLMJudge`` does (same judge
prompt via ``build_judge_sample``, same parser via ``result_from_reply``), so served and offline scores agree.

Response: ``{sample_id, judge, results: [{metric, ok, parse_status, review, score: [A, B] | null, ratio, error,
attempts, swapped}], parsed, failed}``. Also ``GET /`` (a page to score an answer), ``/v1/metrics``, ``/v1/models``, ``/v1/stats``, ``/health``,
``/openapi.json`` and ``/docs``. With ``converse_dir`` (``<out>/converse`` of ``mmrole eval converse``):
``GET /v1/conversations`` (the stored conversations) and ``GET /v1/conversation?model=M&id=C`` (its turns with
per-turn scores and the whole-conversation scores), shown on the page.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from ray import serve

from mmrole.eval.contract import B_ZERO_ERROR, build_judge_sample, result_from_reply
from mmrole.eval.metrics import METRICS
from mmrole.serving import JudgeAppConfig, decode_image, load_characters, models_response, parse_score, score_response
from mmrole.serving.errors import RequestError
from mmrole.serving.schemas import MetricList, ModelList, ScoreResponse

from .common import ServerBase, json_response
from .engine import Job


@serve.deployment(
    name="JudgeServer",
    max_ongoing_requests=16,
    max_queued_requests=32,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class JudgeServer(ServerBase):
    """Reward-model judge: scores an answer against a reference on the 8 MMRole metrics; the (sample, metric)
    judge calls of all requests are batched together."""

    title = "mmrole judge"
    page = "judge.html"

    def __init__(self, config: dict):
        from mmrole.data.templates import load_roleplay_template
        from mmrole.eval.template_loader import load_judge_template

        cfg = JudgeAppConfig.from_dict(config)
        self.judge_template = load_judge_template(cfg.judge_template_path)
        self.template = load_roleplay_template(cfg.template_path)
        self.characters, self._demo_tmp = load_characters(cfg.dataset_root)
        self._setup(cfg)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batch(self, jobs: list[Job]) -> list[Any]:
        return await self._run_batch(jobs)

    def add_routes(self, app) -> None:
        self.route(
            app,
            "POST",
            "/v1/score",
            self._score,
            admit=True,
            body="ScoreRequest",
            response_model=ScoreResponse,
            summary="score an answer against a reference on the 8 metrics",
        )
        self.route(app, "GET", "/v1/models", self._models, response_model=ModelList, summary="served models")
        self.route(app, "GET", "/v1/metrics", self._metrics, response_model=MetricList, summary="metric names")
        self.route(app, "GET", "/v1/conversations", self._conversations, summary="stored converse conversations")
        self.route(
            app, "GET", "/v1/conversation", self._conversation, summary="one stored conversation with its scores"
        )

    def _retry_params(self, attempt: int):
        """Re-ask settings of the offline VLMJudge: sampling, a new seed per attempt."""
        p = self.defaults
        temperature = p.temperature if p.do_sample else self.cfg.retry_temperature
        return dataclasses.replace(p, do_sample=True, temperature=temperature, seed=(p.seed or 0) + attempt)

    async def _score(self, request) -> Any:
        t0 = time.perf_counter()
        body = await self._read_json(request)
        inp = parse_score(body, self.limits, self.characters, self.template, self.cfg.max_retries)

        cache: dict = {}

        def image():  # decoded once, on the gen thread, for all metrics of this request
            if "image" not in cache:
                cache["image"] = decode_image(inp.image, self.limits, "image")
            return cache["image"]

        def prepare_for(req):
            return lambda: self.engine.encode(
                build_judge_sample(req, self.judge_template), image(), self.defaults, "question"
            )

        # One job per metric; a re-ask reuses the job's encoded prompt with sampling params.
        jobs = [Job(self.engine, prepare_for(r), self.defaults) for r in inp.requests]
        results: list[Any] = [None] * len(jobs)
        todo = list(range(len(jobs)))
        max_bs = 0
        for attempt in range(inp.max_retries + 1):
            if not todo:
                break
            if attempt:
                params = self._retry_params(attempt)
                for i in todo:
                    jobs[i] = Job(self.engine, jobs[i].prepare, params, jobs[i].encoded)
            rows = await asyncio.gather(*(self._submit(jobs[i]) for i in todo))
            still = []
            for i, row in zip(todo, rows):
                max_bs = max(max_bs, row.batch_size)
                res = result_from_reply(inp.requests[i], row.text, attempts=attempt + 1, judge=self.cfg.model_name)
                results[i] = res
                if not res.ok and res.error != B_ZERO_ERROR:  # unparsable: ask again; B = 0 is a judgement
                    still.append(i)
            todo = still
        for i in todo:  # still unparsable after every re-ask: a recorded failure (worded as VLMJudge does)
            results[i].error = f"unparsable after {inp.max_retries + 1} replies: {results[i].error}"
        elapsed = time.perf_counter() - t0
        for r in results:
            r.elapsed_s = elapsed / len(results)
        out = score_response(inp.requests[0].sample_id, self.cfg.model_name, results)
        return json_response(out, headers=self._headers({"x-mmrole-batch-size": str(max_bs)}))

    async def _models(self, request) -> Any:
        return json_response(models_response([self.cfg.model_name], self.created), headers=self._headers())

    def _converse_dir(self) -> str:
        if not self.cfg.converse_dir:
            raise RequestError(404, "no converse_dir configured for this judge app", "converse_dir", "not_found")
        return self.cfg.converse_dir

    async def _conversations(self, request) -> Any:
        from mmrole.eval.converse_view import list_conversations

        data = list_conversations(self._converse_dir())
        return json_response({"object": "list", "data": data}, headers=self._headers())

    async def _conversation(self, request) -> Any:
        from mmrole.eval.converse_view import ConversationNotFound, conversation_view

        q = request.query_params
        try:
            view = conversation_view(self._converse_dir(), q.get("model", ""), q.get("id", ""))
        except ConversationNotFound as e:
            raise RequestError(404, str(e.args[0]), "id", "not_found") from None
        return json_response(view, headers=self._headers())

    async def _metrics(self, request) -> Any:
        return json_response({"object": "list", "data": list(METRICS)}, headers=self._headers())


def build_app(args: dict):
    """Serve application builder (``import_path: serve.judge_app:build_app``); ``args`` = JudgeAppConfig."""
    cfg = JudgeAppConfig.from_dict(args)
    return JudgeServer.options(**cfg.deployment.serve_options()).bind(cfg.to_dict())


__all__ = ["JudgeServer", "build_app"]
