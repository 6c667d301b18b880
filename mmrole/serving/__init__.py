"""Serving logic without Ray: typed app configs, request validation, role-play rendering and response shaping.

The Ray Serve applications in ``serve/`` are a thin shell around this package, so everything that decides whether a
request is acceptable is unit-testable without a cluster. Every refusal is a :class:`RequestError` with an HTTP
status (always 4xx for bad input) and an OpenAI-style JSON body whose ``param`` names the offending field.
Validation order matters: cheap checks (sizes, types, counts, image headers) run before any image decoding or model
work, so malformed or hostile input never reaches the model.

One module per concern: ``errors``, ``settings`` (app configs), ``auth``, ``fields`` (typed JSON access, body and
text budgets), ``images``, ``generation`` (decoding fields), ``chat``, ``roleplay``, ``score``, ``stats``,
``characters``, ``schemas`` (pydantic models of the OpenAPI document). Importing it imports neither ray nor torch.
"""

from mmrole.serving.auth import check_bearer
from mmrole.serving.characters import DatasetAssets, load_characters, load_dataset_assets
from mmrole.serving.chat import ChatInput, chat_response, images_per_request, models_response, parse_chat
from mmrole.serving.errors import RequestError, bad_request
from mmrole.serving.fields import (
    TextBudget,
    body_too_large,
    check_content_length,
    field_value,
    header_value,
    parse_json_object,
)
from mmrole.serving.generation import apply_stops, params_key, parse_generation, parse_stream
from mmrole.serving.images import (
    ALLOWED_IMAGE_FORMATS,
    REQUEST_IMAGE,
    decode_image,
    decode_image_url,
    probe_image,
)
from mmrole.serving.roleplay import (
    RoleplayInput,
    parse_character,
    parse_roleplay,
    parse_roleplay_fields,
    roleplay_from_chat,
    roleplay_response,
    roleplay_sample,
)
from mmrole.serving.score import ScoreInput, parse_score, parse_status, result_from_item, score_response
from mmrole.serving.settings import (
    TOKEN_ENV,
    AgentAppConfig,
    AppConfig,
    BatchSettings,
    DeploymentSettings,
    JudgeAppConfig,
    RequestLimits,
    config_from_dict,
)
from mmrole.serving.stats import BatchStats, new_request_id

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "REQUEST_IMAGE",
    "TOKEN_ENV",
    "AgentAppConfig",
    "AppConfig",
    "BatchSettings",
    "BatchStats",
    "ChatInput",
    "DatasetAssets",
    "DeploymentSettings",
    "JudgeAppConfig",
    "RequestError",
    "RequestLimits",
    "RoleplayInput",
    "ScoreInput",
    "TextBudget",
    "apply_stops",
    "bad_request",
    "body_too_large",
    "check_bearer",
    "chat_response",
    "check_content_length",
    "config_from_dict",
    "decode_image",
    "decode_image_url",
    "field_value",
    "header_value",
    "load_characters",
    "load_dataset_assets",
    "models_response",
    "new_request_id",
    "params_key",
    "parse_character",
    "images_per_request",
    "parse_chat",
    "parse_generation",
    "parse_json_object",
    "parse_roleplay",
    "parse_roleplay_fields",
    "parse_score",
    "parse_stream",
    "parse_status",
    "probe_image",
    "result_from_item",
    "roleplay_from_chat",
    "roleplay_response",
    "roleplay_sample",
    "score_response",
]
