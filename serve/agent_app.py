"""Ray Serve app of the role-playing agent: OpenAI-compatible chat completions, a role-play endpoint and a web page.

Routes (JSON; errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status; the OpenAPI
document is at ``/openapi.json``, browsable at ``/docs``):

- ``GET /``: the web page (talk with a character about an image; inter-role mode).
- ``POST /v1/chat/completions``: OpenAI chat request with 1 to ``limits.max_images`` ``image_url`` parts
  (``data:`` URLs; Qwen-VL models take several, each placed in the prompt where the request put it);
  ``max_tokens``/``max_completion_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``stop``, ``seed``,
  ``stream`` (+ ``stream_options.include_usage``). ``model`` picks the base model or one of ``adapters``. With
  a ``character`` field (a dataset name or inline profile; ``extra_body`` in the OpenAI SDK) the messages are a
  role-play: earlier user/assistant turns become the history, rendered with the training template.
- ``POST /v1/roleplay``: ``character`` (a name from the loaded dataset, or ``{name, profile, script?}``),
  ``other`` (same; omitted = a human), ``image``, ``image_info``, ``history`` (``[{speaker, text}]``),
  ``message`` (the other party's last words; omitted = the role opens), ``stream`` -> ``{reply, character,
  usage, ...}``, rendered with the training template.
- ``GET /v1/models``, ``GET /v1/characters`` (``?profile=true`` adds profiles), ``GET /v1/images`` and
  ``GET /v1/images/{path}`` (the dataset's annotated images), ``GET /v1/stats``, ``GET /health``.

Start: ``serve run serve/agent_cpu.yaml`` (tiny CPU model) or ``serve run serve/agent_gpu.yaml``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ray import serve

from mmrole.serving import (
    AgentAppConfig,
    RequestError,
    bad_request,
    chat_response,
    decode_image,
    images_per_request,
    load_dataset_assets,
    models_response,
    new_request_id,
    parse_chat,
    parse_roleplay,
    roleplay_from_chat,
    roleplay_response,
    roleplay_sample,
)
from mmrole.serving.schemas import CharacterList, ChatCompletion, ModelList, RoleplayReply
from mmrole.serving.streaming import chat_chunk, roleplay_chunk

from .common import ServerBase, json_response
from .engine import AdapterPool, Engine, Job, Row, is_lora_dir

MAX_FULL_MODELS_PER_REPLICA = 2  # full-model entries of ``adapters`` kept loaded (LRU); fixed by @serve.multiplexed


@serve.deployment(
    name="AgentServer",
    max_ongoing_requests=32,
    max_queued_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class AgentServer(ServerBase):
    """Role-playing agent: OpenAI-compatible chat, role-play turns rendered with the training template, batched
    decoding shared by streamed and plain requests."""

    title = "mmrole agent"
    page = "agent.html"

    def __init__(self, config: dict):
        from mmrole.data.templates import load_roleplay_template

        cfg = AgentAppConfig.from_dict(config)
        self.template = load_roleplay_template(cfg.template_path)
        assets = load_dataset_assets(cfg.dataset_root)
        self.characters, self.images, self._demo_tmp = assets.characters, assets.images, assets.tmp_dir
        loras = {n: p for n, p in cfg.adapters.items() if is_lora_dir(p)}
        if loras and cfg.engine == "vllm":  # vLLM takes LoRA requests only when started with LoRA on
            cfg.vllm = {**cfg.vllm, "enable_lora": True}
        self._setup(cfg)
        self._full_models = {n: p for n, p in cfg.adapters.items() if n not in loras}
        if loras and getattr(self.engine, "lora_paths", None) is not None:  # engine: vllm: vLLM's LoRA
            self.engine.lora_paths.update(loras)
        elif loras:
            self.engine.pool = AdapterPool(self.engine, loras, cfg.max_adapters, cfg.max_adapter_bytes)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batch(self, jobs: list[Job]) -> list[Any]:
        return await self._run_batch(jobs)

    @serve.multiplexed(max_num_models_per_replica=MAX_FULL_MODELS_PER_REPLICA)
    async def _full_model(self, name: str) -> Engine:
        model = dict(self.cfg.model, model_path=self._full_models[name])
        return await self._load_call(Engine.load, model, name, None, self.cfg.engine, self.cfg.vllm)

    async def _engine_for(self, name: str | None) -> tuple[Engine, str | None, str]:
        """(engine, LoRA adapter or None, model name) serving ``model`` (body field, else the Serve multiplex
        header). LoRA adapters share the base engine and load on first use, in their batch."""
        if not name:
            name = serve.get_multiplexed_model_id() or self.cfg.model_name
        if name == self.cfg.model_name:
            return self.engine, None, name
        if self.engine.pool is not None and name in self.engine.pool.paths:
            return self.engine, name, name
        if name in (getattr(self.engine, "lora_paths", None) or {}):
            return self.engine, name, name
        if name in self._full_models:
            return await self._full_model(name), None, name
        raise RequestError(
            404, f"model {name[:80]!r} is not served here; see GET /v1/models", "model", "model_not_found"
        )

    def add_routes(self, app) -> None:
        self.route(
            app,
            "POST",
            "/v1/chat/completions",
            self._chat,
            admit=True,
            body="ChatCompletionRequest",
            response_model=ChatCompletion,
            stream_doc=True,
            summary="OpenAI chat completion about an image (stream: true for SSE chunks)",
        )
        self.route(
            app,
            "POST",
            "/v1/roleplay",
            self._roleplay,
            admit=True,
            body="RoleplayRequest",
            response_model=RoleplayReply,
            stream_doc=True,
            summary="one role-play turn of a dataset or inline character",
        )
        self.route(app, "GET", "/v1/models", self._models, response_model=ModelList, summary="served models")
        self.route(
            app, "GET", "/v1/characters", self._characters, response_model=CharacterList, summary="dataset roles"
        )
        self.route(app, "GET", "/v1/images", self._images, summary="the dataset's annotated images (a sample)")
        self.route(app, "GET", "/v1/images/{path:path}", self._image, summary="one dataset image (bytes)")

    # -- handlers
    def _job(
        self,
        engine: Engine,
        sample,
        images: list[bytes],
        image_params: list[str],
        params,
        text_param: str,
        adapter=None,
    ) -> Job:
        """One reply row; its images are decoded and its prompt encoded on the gen thread, in its batch."""

        def prepare() -> dict:
            decoded = [decode_image(b, self.limits, p) for b, p in zip(images, image_params)]
            return engine.encode(sample, decoded[0] if len(decoded) == 1 else decoded, params, text_param)

        return Job(engine, prepare, params, adapter=adapter)

    @staticmethod
    def _usage(row: Row) -> dict:
        return {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "total_tokens": row.prompt_tokens + row.completion_tokens,
        }

    async def _limits(self, request) -> Any:
        # What a chat request to the base model may carry: a generic-family model takes one image whatever
        # limits.max_images says.
        most, why = images_per_request(self.limits, self.engine.vlm.family)
        body = dataclasses.asdict(self.limits) | {"max_images": most, "max_images_set_by": why}
        return json_response(body, headers=self._headers())

    async def _chat(self, request) -> Any:
        body = await self._read_json(request)
        inp = parse_chat(body, self.limits, self.defaults, images_per_request(self.limits, self.engine.vlm.family))
        engine, adapter, model_name = await self._engine_for(inp.model)
        most, why = images_per_request(self.limits, engine.vlm.family)
        if len(inp.images) > most:  # a full model of ``adapters`` may take fewer images than the base
            p = inp.image_params[most]
            raise bad_request(p, f"'{p}': too many images for {model_name}: at most {most} ({why})", "too_many_images")
        rid = new_request_id()
        role = roleplay_from_chat(body, inp.turns, self.limits, self.characters)
        sample = roleplay_sample(role, self.template, rid) if role else inp.sample(rid, self.template.system)
        job = self._job(engine, sample, inp.images, inp.image_params, inp.params, "messages", adapter)
        if inp.stream:
            created = int(time.time())

            def chunks(delta: str) -> list[dict]:
                return [chat_chunk(rid, model_name, created, content=delta)]

            def final(row: Row, rest: str) -> list[dict]:
                done = chat_response(
                    rid, model_name, row.text, row.prompt_tokens, row.completion_tokens, inp.params.max_new_tokens
                )
                reason = done["choices"][0]["finish_reason"]
                out = [chat_chunk(rid, model_name, created, content=rest, finish_reason=reason)]
                if inp.include_usage:
                    out.append(chat_chunk(rid, model_name, created, usage=done["usage"], with_choice=False))
                return out

            first = [chat_chunk(rid, model_name, created, role="assistant", content="")]
            return await self._stream(job, chunks, final, {"x-mmrole-request-id": rid}, opening=first)
        row = await self._submit(job)
        out = chat_response(
            rid, model_name, row.text, row.prompt_tokens, row.completion_tokens, inp.params.max_new_tokens
        )
        return json_response(
            out, headers=self._headers({"x-mmrole-batch-size": str(row.batch_size), "x-mmrole-request-id": rid})
        )

    async def _roleplay(self, request) -> Any:
        body = await self._read_json(request)
        inp, image, params = parse_roleplay(body, self.limits, self.defaults, self.characters)
        engine, adapter, model_name = await self._engine_for(inp.model)
        rid = new_request_id()
        sample = roleplay_sample(inp, self.template, inp.sample_id or rid)
        job = self._job(engine, sample, [image], ["image"], params, "message", adapter)
        if inp.stream:

            def chunks(delta: str) -> list[dict]:
                return [roleplay_chunk(rid, model_name, inp.character.name, delta)]

            def final(row: Row, rest: str) -> list[dict]:
                out = [roleplay_chunk(rid, model_name, inp.character.name, rest)] if rest else []
                return out + [roleplay_response(rid, model_name, inp, row.text, self._usage(row), row.history_dropped)]

            return await self._stream(job, chunks, final, {"x-mmrole-request-id": rid})
        row = await self._submit(job)
        out = roleplay_response(rid, model_name, inp, row.text, self._usage(row), row.history_dropped)
        return json_response(
            out, headers=self._headers({"x-mmrole-batch-size": str(row.batch_size), "x-mmrole-request-id": rid})
        )

    async def _models(self, request) -> Any:
        names = [self.cfg.model_name, *self.cfg.adapters]
        return json_response(models_response(names, self.created), headers=self._headers())

    async def _characters(self, request) -> Any:
        with_profile = request.query_params.get("profile", "").lower() in ("1", "true", "yes")
        data = []
        for c in self.characters.values():
            card = {"name": c.name, "script": c.script, "group": c.group, "kind": c.kind, "language": c.language}
            if with_profile:
                card["profile"] = c.profile
            data.append(card)
        return json_response({"object": "list", "data": data}, headers=self._headers())

    async def _images(self, request) -> Any:
        data = [
            {"path": key, "role_info": ref.role_info, "place_info": ref.place_info, "scene_info": ref.scene_info}
            for key, (_, ref) in self.images.items()
        ]
        return json_response({"object": "list", "data": data}, headers=self._headers())

    async def _image(self, request) -> Any:
        from starlette.responses import FileResponse

        key = request.path_params["path"]
        if key not in self.images:  # only listed files: no path from the request reaches the file system
            raise RequestError(404, f"unknown dataset image {key[:120]!r}; see GET /v1/images", "path", "not_found")
        return FileResponse(self.images[key][0], headers=self._headers())


def build_app(args: dict):
    """Serve application builder (``import_path: serve.agent_app:build_app``); ``args`` = AgentAppConfig."""
    cfg = AgentAppConfig.from_dict(args)
    return AgentServer.options(**cfg.deployment.serve_options()).bind(cfg.to_dict())


__all__ = ["AgentServer", "build_app"]
