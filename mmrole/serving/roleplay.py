"""``/v1/roleplay``: role-play fields validated and rendered exactly as training renders a dialogue turn."""

from __future__ import annotations

import difflib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from mmrole.data.records import HUMAN_SPEAKER, Character, ImageRef, Sample, Turn, infer_kind, infer_language
from mmrole.data.render import assemble_question, render_question
from mmrole.data.templates import RoleplayTemplate
from mmrole.models.config import GenerationParams
from mmrole.serving.errors import RequestError, bad_request
from mmrole.serving.fields import TextBudget, field_value
from mmrole.serving.generation import parse_generation, parse_stream
from mmrole.serving.images import REQUEST_IMAGE, decode_image_url, probe_image
from mmrole.serving.settings import RequestLimits


@dataclass
class RoleplayInput:
    """A validated role-play request: who speaks (and to whom), about which image, after which turns."""

    character: Character
    other: Optional[Character]  # None: the other party is the human
    history: list[Turn]
    message: Optional[str]  # the other party's last words; None asks the role to open the conversation
    image_info: ImageRef
    sample_id: str = ""
    model: Optional[str] = None
    stream: bool = False


def parse_character(spec: Any, characters: Mapping[str, Character], param: str, budget: TextBudget) -> Character:
    """A character given by name (from the app's dataset) or inline (``{name, profile, script?, kind?,
    language?}``); unknown names -> 404 with close matches."""
    if isinstance(spec, str):
        if spec in characters:
            return characters[spec]
        close = difflib.get_close_matches(spec, list(characters), n=3)
        hint = (
            f"; did you mean {close}?"
            if close
            else ("" if characters else "; this server has no dataset loaded, give the profile inline")
        )
        raise RequestError(404, f"'{param}': unknown character {spec[:80]!r}{hint}", param, "unknown_character")
    if isinstance(spec, dict):
        allowed = {"name", "profile", "script", "language", "kind"}
        extra = sorted(set(spec) - allowed)
        if extra:
            raise bad_request(param, f"'{param}': unknown field(s) {extra}; allowed {sorted(allowed)}", "unknown_field")
        name = field_value(spec, "name", str, f"{param}.name", required=True).strip()
        profile = budget.take(field_value(spec, "profile", str, f"{param}.profile", required=True), f"{param}.profile")
        if not name:
            raise bad_request(f"{param}.name", f"'{param}.name' must not be empty", "invalid_value")
        script = field_value(spec, "script", str, f"{param}.script", default="")
        kind = field_value(spec, "kind", str, f"{param}.kind", default=None) or infer_kind(script)
        if kind not in ("fictional", "historical-or-public", "hypothetical"):
            raise bad_request(
                f"{param}.kind",
                f"'{param}.kind' must be fictional, historical-or-public or hypothetical",
                "invalid_value",
            )
        language = field_value(spec, "language", str, f"{param}.language", default=None) or infer_language(
            name, profile
        )
        return Character(name=name, script=script, group="inline", kind=kind, language=language, profile=profile)
    raise bad_request(param, f"'{param}' must be a character name or an object with name and profile", "wrong_type")


def parse_roleplay_fields(
    body: Mapping,
    limits: RequestLimits,
    characters: Mapping[str, Character],
    prefix: str = "",
    budget: Optional[TextBudget] = None,
) -> RoleplayInput:
    """The role-play fields (character, other, history, message, image_info) of ``body``."""
    budget = budget or TextBudget(limits)

    def p(k: str) -> str:
        return f"{prefix}{k}"

    if body.get("character") is None:
        raise bad_request(p("character"), f"missing required field '{p('character')}'", "missing_field")
    role = parse_character(body["character"], characters, p("character"), budget)
    other_spec = body.get("other")
    other = None
    if other_spec is not None and not (isinstance(other_spec, str) and other_spec.strip().lower() == HUMAN_SPEAKER):
        other = parse_character(other_spec, characters, p("other"), budget)
    hist = field_value(body, "history", list, p("history"), default=[])
    if len(hist) > limits.max_history_turns:
        raise bad_request(
            p("history"),
            f"'{p('history')}' has {len(hist)} turns; the cap is {limits.max_history_turns}",
            "too_many_turns",
        )
    turns: list[Turn] = []
    for i, h in enumerate(hist):
        hp = f"{p('history')}[{i}]"
        if not isinstance(h, dict):
            raise bad_request(hp, f"'{hp}' must be an object with speaker and text", "wrong_type")
        speaker = field_value(h, "speaker", str, f"{hp}.speaker", required=True)
        text = budget.take(field_value(h, "text", str, f"{hp}.text", required=True), f"{hp}.text")
        turns.append(Turn(speaker=speaker, text=text))
    message = field_value(body, "message", str, p("message"))
    if message is not None:
        budget.take(message, p("message"))
        if not message.strip():
            raise bad_request(
                p("message"), f"'{p('message')}' must not be blank (omit it to let the role open)", "invalid_value"
            )
    info = field_value(body, "image_info", dict, p("image_info"), default={})
    unknown = sorted(set(info) - {"role_info", "place_info", "scene_info"})
    if unknown:
        raise bad_request(p("image_info"), f"'{p('image_info')}': unknown field(s) {unknown}", "unknown_field")
    ref = ImageRef(
        REQUEST_IMAGE,
        *(
            budget.take(field_value(info, k, str, f"{p('image_info')}.{k}", default="") or "", f"{p('image_info')}.{k}")
            or None
            for k in ("role_info", "place_info", "scene_info")
        ),
    )
    return RoleplayInput(character=role, other=other, history=turns, message=message, image_info=ref)


def parse_roleplay(
    body: Mapping, limits: RequestLimits, defaults: GenerationParams, characters: Mapping[str, Character]
) -> tuple[RoleplayInput, bytes, GenerationParams]:
    """Validate a ``/v1/roleplay`` request: role-play fields, ``image`` (data: URL) and decoding options."""
    budget = TextBudget(limits)
    inp = parse_roleplay_fields(body, limits, characters, budget=budget)
    inp.model = field_value(body, "model", str, "model")
    inp.sample_id = field_value(body, "id", str, "id", default="")[:200]
    params = parse_generation(body, limits, defaults)
    inp.stream, _ = parse_stream(body)
    if body.get("image") is None:
        raise bad_request("image", "missing required field 'image' (a data:image/...;base64 URL)", "missing_image")
    data = decode_image_url(body["image"], limits, "image")
    probe_image(data, limits, "image")
    return inp, data, params


def roleplay_sample(inp: RoleplayInput, template: RoleplayTemplate, sample_id: str) -> Sample:
    """The sample the agent answers, rendered exactly as training renders a dialogue turn (same template)."""
    head, header, lines, tail = render_question(
        template, inp.character, inp.other, inp.image_info, inp.history, inp.message
    )
    other_name = template.human_indefinite if inp.other is None else inp.other.name
    return Sample(
        id=sample_id,
        system=template.system,
        user_text=assemble_question(head, header, lines, template.section_separator, tail),
        image=REQUEST_IMAGE,
        target="",
        role=inp.character.name,
        other_role=other_name,
        script=inp.character.script,
        dialogue_type="inter-role" if inp.other is not None else "human-role",
        k=len(inp.history) + (1 if inp.message is not None else 0),
        group=inp.character.group,
        prompt_head=head,
        history_header=header,
        history_lines=lines,
        history_footer=template.section_separator,
        prompt_tail=tail,
    )


def roleplay_response(
    request_id: str, model: str, inp: RoleplayInput, reply: str, usage: dict, history_dropped: int
) -> dict:
    return {
        "id": f"roleplay-{request_id}",
        "object": "roleplay.reply",
        "created": int(time.time()),
        "model": model,
        "character": inp.character.name,
        "other": inp.other.name if inp.other is not None else HUMAN_SPEAKER,
        "reply": reply,
        "history_dropped": history_dropped,
        "usage": usage,
    }


def roleplay_from_chat(
    body: Mapping, turns: Sequence[tuple[str, str]], limits: RequestLimits, characters: Mapping[str, Character]
) -> Optional[RoleplayInput]:
    """An OpenAI chat request with a ``character`` field (e.g. the SDK's ``extra_body``) as a role-play turn: the
    earlier user/assistant messages become the history (user = the human, assistant = the character), the last
    user message is the human's words, and the prompt is the training template's (its system prompt replaces any
    system message). None when the request has no ``character``."""
    if body.get("character") is None:
        return None
    role = parse_character(body["character"], characters, "character", TextBudget(limits))
    if len(turns) - 1 > limits.max_history_turns:
        raise bad_request(
            "messages",
            f"'messages' has {len(turns) - 1} earlier turns; the cap is {limits.max_history_turns}",
            "too_many_turns",
        )
    history = [Turn(speaker=HUMAN_SPEAKER if r == "user" else role.name, text=t) for r, t in turns[:-1]]
    info = field_value(body, "image_info", dict, "image_info", default={})
    unknown = sorted(set(info) - {"role_info", "place_info", "scene_info"})
    if unknown:
        raise bad_request("image_info", f"'image_info': unknown field(s) {unknown}", "unknown_field")
    ref = ImageRef(
        REQUEST_IMAGE,
        *(field_value(info, k, str, f"image_info.{k}") for k in ("role_info", "place_info", "scene_info")),
    )
    return RoleplayInput(
        character=role, other=None, history=history, message=turns[-1][1] or None, image_info=ref, stream=False
    )
