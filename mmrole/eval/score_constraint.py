"""Constrained score decoding for a local judge (``judge.constrained_scores: true``): after the judge's free review
text, the closing score line is generated under a token mask, so every reply ends in a pair that
:func:`mmrole.eval.parse.parse_scores` reads.

Pure: works on the decoded text of each token id (no torch); the transformers ``LogitsProcessor`` that applies it
during ``generate`` lives in :mod:`mmrole.eval.judges`.

The closing line is ``"\\n[Scores]: (A, B)"`` followed by the end token, A and B integers in [1, 10] (the judge
template's format; B > 0, so A / B is always defined). Literal parts are forced as the longest token that fits (so
their token count is known up front); at a score the model chooses among the digit tokens that keep the number
valid. The free review may not contain ``[`` (so the closing line is the reply's only ``[Scores]`` marker and the
parser can never see two different pairs), and it may not end by itself: where the model would end it or start a
``[``, the closing line begins; it begins at the latest when only its worst-case length is left of
``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

SCORE_LEAD = "\n"
SCORE_MARKER = "[Scores]: ("
SCORE_SEP = ", "
SCORE_CLOSE = ")"
SCORE_MIN, SCORE_MAX = 1, 10
BANNED_IN_REVIEW = "["


@dataclass(frozen=True)
class _Num:
    lo: int
    hi: int

    def complete(self, digits: str) -> bool:
        return bool(digits) and (digits == "0" or not digits.startswith("0")) and self.lo <= int(digits) <= self.hi

    def prefix_ok(self, digits: str) -> bool:
        """``digits`` can still become a number in [lo, hi] (no leading zeros)."""
        return any(str(v).startswith(digits) for v in range(self.lo, self.hi + 1))


Part = Union[str, _Num]
# A grammar state: (index of the current part, characters of it consumed so far); index len(parts) = the line is
# complete and only the end token may follow; END_DONE = the end token was generated.
State = tuple[int, str]
END_DONE: State = (-1, "")


def score_format() -> str:
    """The closing line, described (recorded in the cache key and the judge settings file)."""
    return f"{SCORE_LEAD}{SCORE_MARKER}{{{SCORE_MIN}..{SCORE_MAX}}}{SCORE_SEP}{{{SCORE_MIN}..{SCORE_MAX}}}{SCORE_CLOSE}"


class ScoreGrammar:
    """The token-level grammar of the closing score line over a tokenizer's vocabulary.

    ``token_texts[i]``: the decoded text of token id ``i`` alone; ``eos_ids``: the end tokens. Raises
    ``ValueError`` when the vocabulary cannot spell the line (a character with no token)."""

    def __init__(self, token_texts: Sequence[str], eos_ids: Sequence[int]):
        self.parts: list[Part] = [
            SCORE_LEAD + SCORE_MARKER,
            _Num(SCORE_MIN, SCORE_MAX),
            SCORE_SEP,
            _Num(SCORE_MIN, SCORE_MAX),
            SCORE_CLOSE,
        ]
        self.eos_ids = sorted({int(i) for i in eos_ids})
        if not self.eos_ids:
            raise ValueError("constrained scores: the judge model has no end token")
        self.vocab_size = len(token_texts)
        alphabet = set("".join(p for p in self.parts if isinstance(p, str))) | set("0123456789")
        # Only tokens made of the line's characters can ever be allowed in it: a small set even for a large vocab.
        self._cands = {i: t for i, t in enumerate(token_texts) if t and i not in self.eos_ids and set(t) <= alphabet}
        # What the free review may not generate: the end token (the closing line must follow) and any "[".
        self.banned_in_review = frozenset(
            {i for i, t in enumerate(token_texts) if BANNED_IN_REVIEW in (t or "")} | set(self.eos_ids)
        )
        self._allowed: dict[State, list[int]] = {}
        missing = sorted(c for c in alphabet if c not in self._cands.values())
        if missing:
            raise ValueError(f"constrained scores: the tokenizer has no single token for {missing!r}")
        self.max_tokens = self._worst_case_tokens()

    @property
    def start(self) -> State:
        return (0, "")

    def _canonical(self, literal: str) -> Optional[int]:
        """The longest candidate token that is a prefix of ``literal`` (ties: the lowest id)."""
        best = None
        for i, t in self._cands.items():
            if literal.startswith(t) and (best is None or len(t) > len(self._cands[best])):
                best = i
        return best

    def _worst_case_tokens(self) -> int:
        """Tokens of the longest path from the start: canonical literals, one token per digit, the end token."""
        n = 1
        for p in self.parts:
            if isinstance(p, str):
                rest = p
                while rest:
                    rest = rest[len(self._cands[self._canonical(rest)]) :]
                    n += 1
            else:
                n += len(str(p.hi))
        return n

    def advance(self, state: State, token: int) -> Optional[State]:
        """The state after ``token``; None when the grammar does not allow it there."""
        if state == END_DONE:
            return END_DONE
        k, got = state
        if k == len(self.parts):
            return END_DONE if token in self.eos_ids else None
        text = self._cands.get(token)
        if text is None:
            return None
        for ch in text:
            if k == len(self.parts):
                return None  # text after the closing bracket
            part = self.parts[k]
            if isinstance(part, str):
                if part[len(got)] != ch:
                    return None
                got += ch
                if len(got) == len(part):
                    k, got = k + 1, ""
            elif ch.isdigit() and part.prefix_ok(got + ch):
                got += ch
            elif part.complete(got):  # the number ended: this character starts the next literal
                nxt = self.parts[k + 1]
                if not isinstance(nxt, str) or nxt[0] != ch:
                    return None
                k, got = k + 1, ch
                if len(got) == len(nxt):
                    k, got = k + 1, ""
            else:
                return None
        return (k, got)

    def allowed(self, state: State) -> list[int]:
        """Token ids allowed in ``state`` (never empty before the end)."""
        if state == END_DONE:
            return list(self.eos_ids)
        if state not in self._allowed:
            k, got = state
            if k == len(self.parts):
                out = list(self.eos_ids)
            elif isinstance(self.parts[k], str):
                out = [self._canonical(self.parts[k][len(got) :])]
            else:
                num = self.parts[k]
                out = [i for i, t in self._cands.items() if t.isdigit() and num.prefix_ok(got + t)]
                if num.complete(got):
                    out.append(self._canonical(self.parts[k + 1]))
            self._allowed[state] = sorted(set(out))
        return self._allowed[state]


class RowConstraint:
    """One reply being generated: free review, then the closing line. ``step(last_token, top_token,
    n_generated)`` returns what may come next: None (anything but ``banned_in_review``) or the allowed ids."""

    def __init__(self, grammar: ScoreGrammar, max_new_tokens: int):
        if max_new_tokens < grammar.max_tokens:
            raise ValueError(
                f"constrained scores: max_new_tokens={max_new_tokens} cannot hold the score line "
                f"({grammar.max_tokens} tokens); raise judge.generation.max_new_tokens"
            )
        self.g = grammar
        self.max_new_tokens = max_new_tokens
        self.state: Optional[State] = None  # None = free review text
        self.broken = False  # a token outside the grammar was generated: left unconstrained, fails to parse

    def consume(self, token: int) -> None:
        """Record the token generated last (only matters inside the closing line)."""
        if self.state is None or self.broken:
            return
        nxt = self.g.advance(self.state, token)
        if nxt is None:
            self.broken = True
        else:
            self.state = nxt

    def next_allowed(self, top_token: int, n_generated: int) -> Optional[list[int]]:
        """Allowed ids for the next token (None = free text: everything but ``banned_in_review``). The closing
        line starts when the model's top choice would end the review or open a ``[``, or when only its worst-case
        length is left."""
        if self.broken:
            return None
        if self.state is None:
            left = self.max_new_tokens - n_generated
            if left > self.g.max_tokens and top_token not in self.g.banned_in_review:
                return None
            self.state = self.g.start
        return self.g.allowed(self.state)

    @property
    def done(self) -> bool:
        return self.state == END_DONE
