"""Cache keys: what produced a stored answer or judgement, as a digest, so a rerun reuses only what the same
producer made from the same input.

- an answer: the agent (model path and its weight files' sizes/mtimes, or the endpoint and model name; adapter;
  loading settings), the generation parameters, and the sample as rendered by the role-play template (system,
  question, image);
- a judgement: the judge (model or endpoint, generation parameters, re-ask policy), the judge template, and the
  request (question, answer, reference, image, roles, metric, swapped).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from mmrole.models.engines import engine_identity

from .contract import JudgeRequest, Key
from .template import JudgeTemplate


def digest(obj: Any) -> str:
    """A stable sha256 (hex, 32 chars) of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _plain(x: Any) -> Any:
    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) and not isinstance(x, type) else x


def weights_identity(model_path: Optional[str]) -> list:
    """Name, size and mtime of the weight/adapter/config files of a local checkpoint folder ([] for a hub id or
    an endpoint): a retrained checkpoint written to the same path gets a new key."""
    if not model_path:
        return []
    p = Path(model_path)
    if not p.is_dir():
        return []
    out = []
    for f in sorted(p.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".bin", ".model"):
            st = f.stat()
            out.append([f.name, st.st_size, int(st.st_mtime)])
    return out


# Loading settings that do not change what a model answers (where it runs, memory tricks).
_RUNTIME_ONLY = ("device", "gradient_checkpointing", "freeze_vision", "freeze_projector", "share_prefix")


def local_model_identity(vlm_config: Any) -> dict:
    d = {k: v for k, v in _plain(vlm_config).items() if k not in _RUNTIME_ONLY and k != "min_shared_prefix"}
    path = d.get("model_path")
    d["model_path"] = str(Path(path).resolve()) if path and Path(path).exists() else path
    d["weights"] = weights_identity(path)
    return {"kind": "local", **d}


def openai_judge_identity(cfg: Any) -> dict:
    """An OpenAI-compatible judge: endpoint, model and everything that shapes its replies."""
    c = _plain(cfg)
    keep = ("model", "base_url", "temperature", "retry_temperature", "max_tokens", "seed", "max_retries")
    return {
        "kind": "openai",
        **{k: c.get(k) for k in keep},
        "image_detail": c.get("image_detail"),
        "extra_body": c.get("extra_body") or {},
    }


def judge_identity(settings: Any) -> dict:
    """The identity of a :class:`mmrole.eval.job_config.JudgeSettings` judge."""
    if settings.kind == "local":
        ident = {
            **local_model_identity(settings.model),
            "generation": _plain(settings.generation),
            "max_retries": settings.max_retries,
            **engine_identity(getattr(settings, "engine", "hf"), getattr(settings, "vllm", None)),
        }
        if getattr(settings, "constrained_scores", False):  # absent when off: earlier stores keep their keys
            from .score_constraint import score_format

            ident["constrained_scores"] = score_format()
        return ident
    if settings.kind == "openai":
        return openai_judge_identity(settings.openai)
    return {"kind": "serve", "url": settings.serve_url.rstrip("/")}


def template_identity(template: JudgeTemplate) -> str:
    return digest(template.to_dict())


def judgement_keys(requests: Iterable[JudgeRequest], judge: dict, template: JudgeTemplate) -> dict[Key, str]:
    """{(sample_id, metric): cache key} of ``requests`` for this judge identity and template."""
    prefix = digest([judge, template_identity(template)])
    out = {}
    for r in requests:
        out[r.key] = digest(
            [
                prefix,
                r.metric,
                r.question,
                r.answer,
                r.reference,
                r.image,
                r.role,
                r.other_role,
                r.script,
                r.swapped,
            ]
        )
    return out


def agent_identity(agent: dict, generation: Any) -> dict:
    """An answering agent: a local model (``agent.kind: local``) or an OpenAI-compatible endpoint, plus the
    generation parameters."""
    gen = _plain(generation)
    if agent.get("kind", "local") == "local":
        model = {k: v for k, v in agent.items() if k not in ("kind", "engine", "vllm")}
        # the engine (and its settings) only when it is not hf: keys of stores written before it existed hold
        return {**local_model_identity(model), "generation": gen, **_engine_part(agent)}
    keep = ("base_url", "model", "image_detail", "extra_body", "system_role")
    # The endpoint settings sit under ``openai`` in AgentSettings (flat in older callers): either way they are
    # the identity, so another endpoint or model name never reuses these answers.
    endpoint = agent.get("openai") if isinstance(agent.get("openai"), dict) else agent
    return {"kind": agent["kind"], **{k: endpoint.get(k) for k in keep}, "generation": gen}


def _engine_part(agent: dict) -> dict:
    from mmrole.models.engines import VLLMSettings

    v = agent.get("vllm")
    return engine_identity(agent.get("engine", "hf"), VLLMSettings(**v) if isinstance(v, dict) else v)


def answer_key(agent_digest: str, system: str, user_text: str, image: str) -> str:
    """The cache key of one answer: the agent (and generation parameters) and the rendered sample."""
    return digest([agent_digest, system, user_text, image])
