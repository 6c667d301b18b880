"""Ray Serve app of the role-playing agent: OpenAI-compatible chat completions and a role-play endpoint.

Routes (all JSON; errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status):

- ``POST /v1/chat/completions``: OpenAI chat request with exactly one ``image_url`` part (a ``data:`` URL);
  ``max_tokens``/``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``stop``, ``seed``.
  ``model`` picks the base model or one of ``adapters`` (Serve model multiplexing).
- ``POST /v1/roleplay``: ``character`` (a name from the loaded dataset, or ``{name, profile, script?}``),
  ``other`` (same; omitted = a human), ``image``, ``image_info``, ``history`` (``[{speaker, text}]``),
  ``message`` (the other party's last words; omitted = the role opens) -> ``{reply, character, usage, ...}``,
  rendered with the training template.
- ``GET /v1/models``, ``GET /v1/characters``, ``GET /v1/stats`` (batch-size histogram), ``GET /health``.

Start: ``serve run serve/agent_cpu.yaml`` (tiny CPU model) or ``serve run serve/agent_gpu.yaml``.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from mmrole.serving import (
    AgentAppConfig,
    RequestError,
    chat_response,
    decode_image,
    models_response,
    new_request_id,
    parse_chat,
    parse_roleplay,
    roleplay_response,
    roleplay_sample,
)

from .common import Engine, Job, Row, ServerBase, common_routes, json_response

MAX_ADAPTERS_PER_REPLICA = 3  # LoRA agents kept loaded per replica (LRU); fixed by @serve.multiplexed


def _load_characters(root: str | None):
    """name -> Character from a dataset root ("demo": the generated demo dataset, in a temp dir)."""
    if not root:
        return {}, None
    import tempfile

    from mmrole.data.reader import load_dataset

    tmp = None
    if root == "demo":
        from mmrole.data.demo import build_demo

        tmp = tempfile.mkdtemp(prefix="mmrole-demo-")
        root = f"{tmp}/MMRole_dataset"
        build_demo(root, seed=0)
    return dict(load_dataset(root).characters), tmp


@serve.deployment(
    name="AgentServer",
    max_ongoing_requests=32,
    max_queued_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
class AgentServer(ServerBase):
    """One replica: the base agent (+ LoRA agents on demand), batched decoding."""

    def __init__(self, config: dict):
        from mmrole.data.templates import load_roleplay_template

        cfg = AgentAppConfig.from_dict(config)
        self.template = load_roleplay_template(cfg.template_path)
        self.characters, self._demo_tmp = _load_characters(cfg.dataset_root)
        self._setup(cfg)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batch(self, jobs: list[Job]) -> list[Any]:
        return await self._run_batch(jobs)

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def _adapter(self, name: str) -> Engine:
        model = dict(self.cfg.model, model_path=self.cfg.adapters[name])
        return await self._load_call(Engine.load, model, name, None)

    async def _engine_for(self, name: str | None) -> Engine:
        """The engine serving ``model`` (body field, else the Serve multiplex header)."""
        if not name:
            name = serve.get_multiplexed_model_id() or self.cfg.model_name
        if name == self.cfg.model_name:
            return self.engine
        if name in self.cfg.adapters:
            return await self._adapter(name)
        raise RequestError(
            404, f"model {name[:80]!r} is not served here; see GET /v1/models", "model", "model_not_found"
        )

    def routes(self):
        return {
            ("POST", "/v1/chat/completions"): (self._chat, True),
            ("POST", "/v1/roleplay"): (self._roleplay, True),
            ("GET", "/v1/models"): (self._models, True),
            ("GET", "/v1/characters"): (self._characters, True),
            **common_routes(self),
        }

    async def __call__(self, request) -> Any:
        return await self._dispatch(request)

    # -- handlers
    async def _generate(
        self, engine: Engine, sample, image_bytes: bytes, image_param: str, params, text_param: str
    ) -> Row:
        """Queue one reply; its image is decoded and its prompt encoded on the gen thread, in its batch."""

        def prepare() -> dict:
            image = decode_image(image_bytes, self.limits, image_param)
            return engine.encode(sample, image, params, text_param)

        return await self._submit(Job(engine, prepare, params))

    @staticmethod
    def _usage(row: Row) -> dict:
        return {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "total_tokens": row.prompt_tokens + row.completion_tokens,
        }

    async def _chat(self, request) -> Any:
        body = await self._read_json(request)
        inp = parse_chat(body, self.limits, self.defaults)
        engine = await self._engine_for(inp.model)
        rid = new_request_id()
        sample = inp.sample(rid, self.template.system)
        row = await self._generate(engine, sample, inp.image, inp.image_param, inp.params, "messages")
        out = chat_response(
            rid, engine.name, row.text, row.prompt_tokens, row.completion_tokens, inp.params.max_new_tokens
        )
        return json_response(
            out, headers=self._headers({"x-mmrole-batch-size": str(row.batch_size), "x-request-id": rid})
        )

    async def _roleplay(self, request) -> Any:
        body = await self._read_json(request)
        inp, image, params = parse_roleplay(body, self.limits, self.defaults, self.characters)
        engine = await self._engine_for(inp.model)
        rid = new_request_id()
        sample = roleplay_sample(inp, self.template, inp.sample_id or rid)
        row = await self._generate(engine, sample, image, "image", params, "message")
        out = roleplay_response(rid, engine.name, inp, row.text, self._usage(row), row.history_dropped)
        return json_response(
            out, headers=self._headers({"x-mmrole-batch-size": str(row.batch_size), "x-request-id": rid})
        )

    async def _models(self, request) -> Any:
        names = [self.cfg.model_name, *self.cfg.adapters]
        return json_response(models_response(names, self.created), headers=self._headers())

    async def _characters(self, request) -> Any:
        data = [
            {"name": c.name, "script": c.script, "group": c.group, "kind": c.kind, "language": c.language}
            for c in self.characters.values()
        ]
        return json_response({"object": "list", "data": data}, headers=self._headers())

    def __del__(self):
        self._shutdown()
        tmp = getattr(self, "_demo_tmp", None)
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def build_app(args: dict):
    """Serve application builder (``import_path: serve.agent_app:build_app``); ``args`` = AgentAppConfig."""
    cfg = AgentAppConfig.from_dict(args)
    return AgentServer.options(**cfg.deployment.serve_options()).bind(cfg.to_dict())


__all__ = ["AgentServer", "build_app"]
