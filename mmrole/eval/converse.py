"""Whole-conversation evaluation, the pure core: test items, conversations turn by turn, their store, resume, and the
judge requests that score them. No Ray here (the Ray shell is :mod:`mmrole.ray_converse`).

A test item is a character, an image and an opening (the first words of the test dialogue, when the partner spoke
first; otherwise the character opens). The agent under test talks for N turns with a **partner**: a simulated
curious human (``human-role`` items, the partner template) or the dialogue's other character (``inter-role``).
Every turn is one line of an append-only store, stamped with a cache key of who produced it from which prompt
(the prompt holds the whole conversation so far), so a stopped run resumes at the last finished turn and a
changed agent, partner or template starts the conversation again. A turn that fails ends its conversation there
(recorded with the reason). With ``partner_turns: shared`` the first model talks with the partner and every other
model answers the same partner turns (copied), so pairwise judging compares replies to the same words.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional

from mmrole.data.records import HUMAN_SPEAKER, Character, Dialogue, ImageRef, Sample, Turn
from mmrole.data.render import turn_sample
from mmrole.data.templates import RoleplayTemplate

from .cache_keys import answer_key, digest
from .contract import JudgeRequest
from .converse_templates import PartnerTemplate
from .template import JudgeTemplate

PARTNER = "partner"  # the participant name of the partner (the models under test are "agent:<model>")
CONVERSATIONAL_TYPES = ("human-role", "inter-role")


def agent_participant(model: str) -> str:
    return f"agent:{model}"


# ------------------------------------------------------------------------------------------------- items
@dataclass(frozen=True)
class ConverseItem:
    """One conversation to hold: the agent plays ``role`` with ``partner`` (None = the simulated human)."""

    id: str
    role: str
    partner: Optional[str]
    image: ImageRef
    opening: Optional[str]  # the partner's first words; None: the agent opens
    intent: str  # the simulated human's stated intent ("" for another character)
    dialogue_type: str
    group: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ItemStats:
    """Test samples in, conversation items out, and every sample not used with its reason."""

    samples_in: int = 0
    items_out: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejects: list = field(default_factory=list)

    def reject(self, sid: str, code: str, reason: str) -> None:
        self.rejected[code] += 1
        self.rejects.append({"id": sid, "code": code, "reason": reason})

    def to_dict(self) -> dict:
        return {
            "samples_in": self.samples_in,
            "items_out": self.items_out,
            "rejected": dict(self.rejected),
            # Items past max_items are only counted: listing them would bury the real rejects.
            "rejects": [r for r in self.rejects if r["code"] != "max_items"][:20],
        }


def build_items(
    samples: Iterable[Sample],
    dialogues: Mapping[str, Dialogue],
    characters: Mapping[str, Character],
    partner_template: PartnerTemplate,
    *,
    types: Sequence[str] = CONVERSATIONAL_TYPES,
    seed: int = 0,
    max_items: Optional[int] = None,
) -> tuple[list[ConverseItem], ItemStats]:
    """One item per test dialogue of ``types`` (its first test sample names the role); the intent of a simulated
    human is picked by ``seed`` and the item id, so a rerun holds the same conversations."""
    stats = ItemStats()
    items: list[ConverseItem] = []
    seen: set[str] = set()
    # Types interleaved (one of each in turn, in split order), so max_items keeps every type represented.
    by_type: dict[str, list[Sample]] = {}
    for s in samples:
        by_type.setdefault(s.dialogue_type, []).append(s)
    queues = [by_type[t] for t in sorted(by_type)]
    ordered = [q[i] for i in range(max((len(q) for q in queues), default=0)) for q in queues if i < len(q)]
    for s in ordered:
        stats.samples_in += 1
        did = s.id.rsplit("_", 1)[0]
        if s.dialogue_type not in types:
            stats.reject(s.id, "type", f"dialogue type {s.dialogue_type!r} is not one of {list(types)}")
            continue
        if did in seen:
            stats.reject(s.id, "same_dialogue", f"dialogue {did} already gives an item")
            continue
        d = dialogues.get(did)
        if d is None:
            stats.reject(s.id, "no_dialogue", f"dialogue {did} not found under the dataset's dialogues/")
            continue
        if s.role not in characters:
            stats.reject(s.id, "no_profile", f"no profile for {s.role!r}")
            continue
        partner = None
        if s.dialogue_type == "inter-role":
            others = [x for x in d.speakers if x not in (s.role, HUMAN_SPEAKER)]
            if not others:
                stats.reject(s.id, "no_partner", "the role talks to itself in this dialogue")
                continue
            partner = others[0]
            if partner not in characters:
                stats.reject(s.id, "no_profile", f"no profile for the partner {partner!r}")
                continue
        if max_items is not None and len(items) >= max_items:
            stats.reject(s.id, "max_items", f"max_items={max_items} reached")
            continue
        first = d.turns[0] if d.turns else None
        opening = first.text if first is not None and first.speaker != s.role and first.text.strip() else None
        intent = ""
        if partner is None:
            intent = partner_template.intent(int(digest([seed, did]), 16), s.role)
        seen.add(did)
        items.append(ConverseItem(did, s.role, partner, d.image, opening, intent, s.dialogue_type, s.group))
    stats.items_out = len(items)
    return items, stats


# ------------------------------------------------------------------------------------------ conversations
@dataclass
class TurnRecord:
    """One stored turn. ``index`` is the position in the conversation; ``agent_turn`` counts the agent's turns
    (0-based; -1 for the partner's). ``source``: generated, opening (the test dialogue's words) or replay:<model>
    (a partner turn copied from the first model's conversation)."""

    conv: str
    model: str
    index: int
    speaker: str  # "agent" | "partner"
    name: str  # the speaker's name in the conversation (a character, or "human")
    text: str
    error: str = ""
    source: str = "generated"
    agent_turn: int = -1
    cache_key: str = ""
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TurnRecord:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Conversation:
    """A conversation of ``model`` on ``item`` so far; ``ended`` says why it stopped early (a failed turn, or
    partner turns that ran out)."""

    item: ConverseItem
    model: str
    turns: list[TurnRecord] = field(default_factory=list)
    ended: str = ""

    @property
    def agent_turns(self) -> int:
        return sum(t.speaker == "agent" and not t.error for t in self.turns)

    def dialogue(self) -> list[Turn]:
        return [Turn(t.name, t.text) for t in self.turns]


class Cast:
    """Who speaks in the conversations and how their prompts are rendered: the characters, the role-play template
    (agents and a partner character) and the partner template (the simulated human)."""

    def __init__(
        self,
        characters: Mapping[str, Character],
        roleplay: RoleplayTemplate,
        partner_template: PartnerTemplate,
        digests: Mapping[str, str],
    ):
        self.characters = characters
        self.roleplay = roleplay
        self.partner_template = partner_template
        self.digests = dict(digests)  # participant -> digest of its identity and generation parameters

    def next_speaker(self, conv: Conversation) -> str:
        """ "agent" or "partner": the partner speaks first when the item has an opening, then they alternate."""
        first = "partner" if conv.item.opening is not None else "agent"
        second = "agent" if first == "partner" else "partner"
        return first if len(conv.turns) % 2 == 0 else second

    def speaker_name(self, item: ConverseItem, speaker: str) -> str:
        if speaker == "agent":
            return item.role
        return item.partner if item.partner is not None else HUMAN_SPEAKER

    def agent_sample(self, conv: Conversation, upto: Optional[int] = None) -> Sample:
        """The prompt of the agent's next turn (or of the turn at position ``upto``): the conversation before it."""
        item = conv.item
        turns = conv.dialogue()[: len(conv.turns) if upto is None else upto]
        other = self.characters[item.partner] if item.partner is not None else None
        return turn_sample(
            self.roleplay,
            self.characters[item.role],
            other,
            item.image,
            turns,
            sample_id=f"{conv.model}|{item.id}|{len(turns)}",
            dialogue_type=item.dialogue_type,
        )

    def partner_sample(self, conv: Conversation, upto: Optional[int] = None) -> Sample:
        """The prompt of the partner's next turn: the other character (role-play template, from its side), or the
        simulated human (partner template)."""
        item = conv.item
        turns = conv.dialogue()[: len(conv.turns) if upto is None else upto]
        sid = f"{conv.model}|{item.id}|{len(turns)}"
        if item.partner is not None:
            return turn_sample(
                self.roleplay,
                self.characters[item.partner],
                self.characters[item.role],
                item.image,
                turns,
                sample_id=sid,
                dialogue_type=item.dialogue_type,
            )
        role = self.characters[item.role]
        system, text = self.partner_template.render(
            role=role.name, script=role.script, intent=item.intent, image=item.image, turns=turns, human=HUMAN_SPEAKER
        )
        return Sample(
            id=sid,
            system=system,
            user_text=text,
            image=item.image.path,
            target="",
            role=HUMAN_SPEAKER,
            other_role=role.name,
            script="",
            dialogue_type=item.dialogue_type,
            k=len(turns),
            group=role.group,
        )

    def expected_key(self, conv: Conversation, index: int, speaker: str, participant: str) -> str:
        """The cache key a stored turn at ``index`` must carry to be reused: who speaks, from which prompt."""
        if index == 0 and speaker == "partner" and conv.item.opening is not None:
            return digest(["opening", conv.item.id, conv.item.opening])
        s = self.agent_sample(conv, index) if speaker == "agent" else self.partner_sample(conv, index)
        return answer_key(self.digests[participant], s.system, s.user_text, s.image)


def replay_key(lead_key: str) -> str:
    return digest(["replay", lead_key])


def lead_partner_turn(lead: Optional[Conversation], index: int) -> Optional[TurnRecord]:
    """The first model's partner turn at ``index``, when it has a finished one to copy."""
    if lead is None or index >= len(lead.turns):
        return None
    t = lead.turns[index]
    return t if t.speaker == "partner" and not t.error else None


def expected_turn_key(cast: Cast, conv: Conversation, index: int, speaker: str, lead: Optional[Conversation]):
    """The cache key of the turn at ``index``: a replayed partner turn carries the lead's key (None while the lead
    has no such turn); any other turn the key of its speaker and prompt."""
    replayed = speaker == "partner" and lead is not None and not (index == 0 and conv.item.opening is not None)
    if replayed:
        t = lead_partner_turn(lead, index)
        return replay_key(t.cache_key) if t is not None else None
    participant = agent_participant(conv.model) if speaker == "agent" else PARTNER
    return cast.expected_key(conv, index, speaker, participant)


def restore(
    cast: Cast,
    conv: Conversation,
    records: Sequence[TurnRecord],
    lead: Optional[Conversation] = None,
    retry_failed: bool = False,
) -> int:
    """Rebuild ``conv`` from its stored records: position by position, the first record whose cache key matches
    the one this run would produce (``lead``: the first model's restored conversation, whose partner turns this
    one copies); stops at the first position without one. A failed turn ends the conversation (``retry_failed``
    skips failures, so they are asked again). Returns the number of records not reused."""
    by_index: dict[int, list[TurnRecord]] = {}
    for r in records:
        by_index.setdefault(r.index, []).append(r)
    used = 0
    i = 0
    while i in by_index:
        speaker = cast.next_speaker(conv)
        want = expected_turn_key(cast, conv, i, speaker, lead)
        match = next(
            (
                r
                for r in by_index[i]
                if r.speaker == speaker and r.cache_key == want and want is not None and not (retry_failed and r.error)
            ),
            None,
        )
        if match is None:
            break
        conv.turns.append(match)
        used += 1
        if match.error:
            conv.ended = f"turn {i} ({match.speaker}) failed: {match.error}"
            break
        i += 1
    return len(records) - used


# ------------------------------------------------------------------------------------------- judging
def transcript(conv: Conversation) -> str:
    """The whole conversation as ``[speaker]: text`` lines (failed turns left out)."""
    return "\n".join(f"[{t.name}]: {t.text}" for t in conv.turns if not t.error)


def agent_turns(conv: Conversation) -> list[TurnRecord]:
    return [t for t in conv.turns if t.speaker == "agent" and not t.error]


def _request(
    cast: Cast,
    template: JudgeTemplate,
    sid: str,
    metric: str,
    question: str,
    answer: str,
    reference: str,
    conv: Conversation,
    swapped: bool = False,
) -> JudgeRequest:
    other = conv.item.partner or template.roles.human
    return JudgeRequest(
        sample_id=sid,
        metric=metric,
        question=question,
        answer=answer,
        reference=reference,
        image=conv.item.image.path,
        role=conv.item.role,
        other_role=other,
        script=cast.characters[conv.item.role].script,
        dialogue_type=conv.item.dialogue_type,
        swapped=swapped,
        scale=template.scale.kind,
        scale_min=template.scale.min,
        scale_max=template.scale.max,
    )


def turn_requests(cast: Cast, conv: Conversation, template: JudgeTemplate) -> list[JudgeRequest]:
    """Absolute: every agent turn on every metric of ``template``, the judge seeing what the agent saw (the
    character, the image and the conversation so far). Sample id ``<conv>#t<agent turn>``."""
    out = []
    for t in agent_turns(conv):
        question = cast.agent_sample(conv, t.index).user_text
        out.extend(
            _request(cast, template, f"{conv.item.id}#t{t.agent_turn}", m, question, t.text, "", conv)
            for m in template.metrics
        )
    return out


def conversation_question(cast: Cast, conv: Conversation) -> str:
    """What a whole-conversation judge is given besides the turns: the character(s) and the picture."""
    return cast.agent_sample(conv, 0).prompt_head.strip()


def conversation_requests(cast: Cast, conv: Conversation, template: JudgeTemplate) -> list[JudgeRequest]:
    """Absolute: the whole conversation on every metric of ``template``. Sample id ``<conv>``."""
    if not agent_turns(conv):
        return []
    q, text = conversation_question(cast, conv), transcript(conv)
    return [_request(cast, template, conv.item.id, m, q, text, "", conv) for m in template.metrics]


def _swap(seed: int, *parts) -> bool:
    """A fixed half of the pairwise requests show the models the other way round (position bias averages out)."""
    return int(digest([seed, *parts]), 16) % 2 == 1


def shared_partner_turns(a: Conversation, b: Conversation) -> int:
    """How many positions from the start both conversations' partner turns are the same."""
    n = 0
    for x, y in zip(a.turns, b.turns):
        if x.speaker != y.speaker:
            break
        if x.speaker == "partner" and (x.text != y.text or x.error or y.error):
            break
        n += 1
    return n


def pairwise_turn_requests(
    cast: Cast, a: Conversation, b: Conversation, template: JudgeTemplate, seed: int = 0
) -> list[JudgeRequest]:
    """Pairwise: agent turn j of model a vs of model b, where both answer the same partner words (the judge sees
    the character, the image and those words). Sample id ``<conv>#t<j>``; ``answer`` is a's, ``reference`` b's."""
    n = shared_partner_turns(a, b)
    out = []
    bt = {t.index: t for t in agent_turns(b)}
    for t in agent_turns(a):
        u = bt.get(t.index)
        if u is None or t.index > n:
            continue
        s = cast.agent_sample(a, t.index)
        question = s.user_text_with_history(keep_last=0)
        sid = f"{a.item.id}#t{t.agent_turn}"
        out.extend(
            _request(cast, template, sid, m, question, t.text, u.text, a, swapped=_swap(seed, a.model, b.model, sid, m))
            for m in template.metrics
        )
    return out


def pairwise_conversation_requests(
    cast: Cast, a: Conversation, b: Conversation, template: JudgeTemplate, seed: int = 0
) -> list[JudgeRequest]:
    """Pairwise: the two whole conversations (same partner turns) on every metric of ``template``."""
    if not agent_turns(a) or not agent_turns(b):
        return []
    q = conversation_question(cast, a)
    ta, tb = transcript(a), transcript(b)
    sid = a.item.id
    return [
        _request(cast, template, sid, m, q, ta, tb, a, swapped=_swap(seed, a.model, b.model, sid, m))
        for m in template.metrics
    ]
