"""Pydantic models of the HTTP API, for the OpenAPI document (``/openapi.json``, ``/docs``) and for clients.

The handlers validate request bodies with the parsers of this package (``parse_chat``, ``parse_roleplay``,
``parse_score``), which check sizes before decoding anything and name the offending field in a 4xx error; these
models describe the same contract (the tests check that valid requests and real responses fit them).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema


class _Open(BaseModel):
    """Unknown fields are allowed (OpenAI clients send many); known ones are typed."""

    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------------ errors


class ErrorBody(BaseModel):
    message: str
    type: Literal["invalid_request_error", "authentication_error", "server_error"]
    param: Optional[str] = Field(None, description="the offending field, as a dotted path (e.g. messages[1].content)")
    code: str


class ErrorResponse(BaseModel):
    """Every refusal and failure: 4xx for bad input, 401 without a valid token, 503 when overloaded (with
    ``Retry-After``), 500 for server faults."""

    error: ErrorBody


# ------------------------------------------------------------------------------------------------ chat


class ImageURL(_Open):
    url: str = Field(..., description="data:image/<png|jpeg|gif|webp|bmp>;base64,... (remote URLs are refused)")
    detail: Optional[str] = None


class ContentPart(_Open):
    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[Union[ImageURL, str]] = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionRequest(_Open):
    """OpenAI chat request; images go in user messages as ``image_url`` parts (up to ``limits.max_images``, each
    placed in the prompt where it is; one image goes first)."""

    model: Optional[str] = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[Literal[1]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    character: Optional[Union[str, CharacterSpec]] = Field(
        None, description="role-play: user/assistant turns become the history of this character's dialogue"
    )
    image_info: Optional[ImageInfo] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    """The reply (``stream: false``). With ``stream: true`` the reply is ``text/event-stream`` of
    ``chat.completion.chunk`` objects ending with ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


# ------------------------------------------------------------------------------------------------ role-play


class CharacterSpec(_Closed):
    name: str
    profile: str
    script: Optional[str] = None
    language: Optional[str] = None
    kind: Optional[Literal["fictional", "historical-or-public", "hypothetical"]] = None


class HistoryTurn(_Open):
    speaker: str = Field(..., description='"human" or a character name')
    text: str


class ImageInfo(_Closed):
    role_info: Optional[str] = None
    place_info: Optional[str] = None
    scene_info: Optional[str] = None


class RoleplayFields(_Open):
    character: Union[str, CharacterSpec] = Field(..., description="a character of the app's dataset, or inline")
    other: Optional[Union[str, CharacterSpec]] = Field(None, description='"human" (default) or a character')
    history: list[HistoryTurn] = Field(default_factory=list)
    message: Optional[str] = Field(None, description="the other party's last words; omit to let the role open")
    image_info: Optional[ImageInfo] = None


class RoleplayRequest(RoleplayFields):
    """One role-play turn, rendered with the training template."""

    image: str = Field(..., description="data:image/...;base64,...")
    model: Optional[str] = None
    id: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = Field(
        False,
        description="text/event-stream of roleplay.chunk objects, then the whole roleplay.reply, then [DONE]",
    )


class RoleplayReply(BaseModel):
    id: str
    object: Literal["roleplay.reply"]
    created: int
    model: str
    character: str
    other: str
    reply: str
    history_dropped: int
    usage: Usage


class RoleplayChunk(BaseModel):
    id: str
    object: Literal["roleplay.chunk"]
    created: int
    model: str
    character: str
    delta: str


# ------------------------------------------------------------------------------------------------ judge


class ScoreRequest(_Open):
    """Score ``answer`` ("Model A") against ``reference`` ("Model B") about ``image``; give exactly one of
    ``question`` or ``sample``."""

    answer: str
    reference: str
    image: str = Field(..., description="data:image/...;base64,...")
    question: Optional[str] = None
    sample: Optional[RoleplayFields] = None
    metrics: Optional[list[str]] = Field(None, min_length=1, description="default: all 8")
    sample_id: Optional[str] = None
    role: Optional[str] = None
    other_role: Optional[str] = None
    script: Optional[str] = None
    swapped: Optional[bool] = False
    max_retries: Optional[int] = Field(None, ge=0)
    set_name: Optional[str] = None
    dialogue_type: Optional[str] = None


class MetricResult(BaseModel):
    metric: str
    ok: bool
    parse_status: Literal["ok", "zero_reference", "unparsable"]
    review: str
    score: Optional[list[float]] = Field(None, description="[answer score, reference score]")
    ratio: Optional[float] = None
    error: Optional[str] = None
    attempts: int
    swapped: bool


class ScoreResponse(BaseModel):
    object: Literal["score"]
    sample_id: str
    judge: str
    results: list[MetricResult]
    parsed: int
    failed: int


# ------------------------------------------------------------------------------------------------ listings


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class CharacterCard(BaseModel):
    name: str
    script: str
    group: str
    kind: str
    language: str
    profile: Optional[str] = None


class CharacterList(BaseModel):
    object: Literal["list"]
    data: list[CharacterCard]


class MetricList(BaseModel):
    object: Literal["list"]
    data: list[str]


class Health(BaseModel):
    status: Literal["ok"]
    replica: str


REQUEST_MODELS = (ChatCompletionRequest, RoleplayRequest, ScoreRequest)


def request_schemas() -> tuple[dict[str, str], dict]:
    """(model name -> ``$ref``, component schemas) of the request models, for the OpenAPI document."""
    refs, defs = models_json_schema(
        [(m, "validation") for m in REQUEST_MODELS], ref_template="#/components/schemas/{model}"
    )
    return {m.__name__: refs[(m, "validation")]["$ref"] for m in REQUEST_MODELS}, defs.get("$defs", {})
