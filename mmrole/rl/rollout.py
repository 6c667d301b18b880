"""Rollouts: G sampled replies per prompt from the current policy, in one batched ``generate`` call, each row
seeded on its own (pure torch + transformers, no Ray).

Sampling is the Gumbel-max trick inside a logits processor: every row adds Gumbel noise drawn from its *own*
generator (seeded from (run seed, step, sample id, rollout index)) to its temperature-scaled, top-p-filtered logits,
and greedy decoding takes the argmax, which is a sample of ``softmax(logits / T)``. So a rollout depends only on its
seed and the weights, not on which other rows share the batch, the batch size or the world size; a resumed run
draws exactly the rollouts of the uninterrupted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

IGNORE_INDEX = -100
TEXT_KEYS = ("meta",)  # encoded-sample keys that are not model inputs (the sample's text fields)


def model_inputs(encoded: dict) -> dict:
    """An encoded sample without its text-only keys (what ``pad_batch`` takes)."""
    return {k: v for k, v in encoded.items() if k not in TEXT_KEYS}


def rollout_seed(seed: int, step: int, sample_id: str, index: int) -> int:
    """A 63-bit seed from (seed, step, sample id, rollout index)."""
    h = hashlib.blake2b(f"{seed}|{step}|{sample_id}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") & ((1 << 63) - 1)


class RowSeededSampler:
    """A transformers logits processor that turns greedy decoding into per-row seeded sampling (Gumbel-max)."""

    def __init__(
        self,
        seeds: Sequence[int],
        device: torch.device,
        temperature: float = 1.0,
        top_p: float = 1.0,
        banned: Sequence[int] = (),
    ):
        if temperature <= 0:
            raise ValueError("temperature must be > 0 for sampling")
        self.gens = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
            self.gens.append(g)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.banned = list(banned)  # never sampled (vision placeholders: a reply must not claim image features)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.banned:
            logits[:, self.banned] = float("-inf")
        if self.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, dim=-1) > self.top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
        u = torch.stack(
            [torch.rand(logits.shape[-1], generator=g, device=logits.device) for g in self.gens[: logits.shape[0]]]
        )
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))
        return logits + gumbel


@dataclass
class Rollout:
    """One sampled reply: its prompt (index into the encoded prompts), rollout index, token ids (up to and
    including an end token when one was generated), text, and an error when generation failed."""

    prompt: int
    index: int
    sample_id: str
    token_ids: list[int] = field(default_factory=list)
    text: Optional[str] = None
    finished: bool = False  # ended with an end token (not cut at max_new_tokens)
    error: Optional[str] = None

    @property
    def rollout_id(self) -> str:
        return f"{self.sample_id}#g{self.index}"


def banned_token_ids(vlm) -> list[int]:
    """Control tokens a reply may not contain (chat and vision markers), except the end tokens: a sampled
    ``<|image_pad|>`` would ask the model for image features that do not exist when the rollout is trained on."""
    from mmrole.models.encoding import CONTROL_TOKENS

    eos = set(vlm.eos_token_ids())
    tok = vlm.tokenizer
    ids = {tok.convert_tokens_to_ids(t) for t in CONTROL_TOKENS}
    unk = getattr(tok, "unk_token_id", None)
    return sorted(int(i) for i in ids if i is not None and i != unk and int(i) not in eos)


def _generate(vlm, prompts: list[dict], seeds: list[int], max_new_tokens: int, temperature, top_p) -> list[list[int]]:
    from transformers import LogitsProcessorList

    batch = vlm.to_device(vlm.pad_batch([model_inputs(p) for p in prompts], padding_side="left"))
    batch.pop("labels", None)
    sampler = RowSeededSampler(seeds, batch["input_ids"].device, temperature, top_p, banned_token_ids(vlm))
    out = vlm.model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        logits_processor=LogitsProcessorList([sampler]),
        eos_token_id=vlm.eos_token_ids(),
        pad_token_id=vlm.encoder.pad_token_id,
    )
    return out[:, batch["input_ids"].shape[1] :].tolist()


@torch.no_grad()
def sample_rollouts(
    vlm,
    prompts: Sequence[dict],
    group_size: int,
    seeds: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 0,
) -> list[Rollout]:
    """``group_size`` rollouts per encoded prompt (``encode(..., with_target=False)``), prompt by prompt;
    ``seeds[p][g]`` seeds rollout g of prompt p. Rows go through ``generate`` ``batch_size`` at a time (0 = all
    at once). A batch that raises is retried row by row, so one bad prompt fails alone (recorded in ``error``)."""
    rows = [(p, g) for p in range(len(prompts)) for g in range(group_size)]
    eos = set(vlm.eos_token_ids())
    out: list[Rollout] = []
    was_training = vlm.model.training
    vlm.model.eval()
    try:
        step = batch_size or len(rows) or 1
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            try:
                new = _generate(
                    vlm,
                    [prompts[p] for p, _ in chunk],
                    [seeds[p][g] for p, g in chunk],
                    max_new_tokens,
                    temperature,
                    top_p,
                )
                results: list[Any] = new
            except (ValueError, RuntimeError) as e:
                if len(chunk) == 1:
                    results = [e]
                else:
                    results = []
                    for p, g in chunk:
                        try:
                            results += _generate(vlm, [prompts[p]], [seeds[p][g]], max_new_tokens, temperature, top_p)
                        except (ValueError, RuntimeError) as e1:
                            results.append(e1)
            for (p, g), ids in zip(chunk, results):
                sid = str(prompts[p].get("id", p))
                if isinstance(ids, Exception):
                    out.append(Rollout(p, g, sid, error=f"{type(ids).__name__}: {ids}"))
                    continue
                cut = next((i for i, t in enumerate(ids) if t in eos), None)
                kept = ids if cut is None else ids[: cut + 1]
                text_ids = kept if cut is None else kept[:-1]
                text = vlm.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
                out.append(Rollout(p, g, sid, [int(t) for t in kept], text, finished=cut is not None))
    finally:
        if was_training:
            vlm.model.train()
    return out


def training_sample(prompt: dict, reply_ids: Sequence[int], pad_token_id: int = 0) -> dict:
    """The encoded sample ``prompt + reply`` with labels on the reply tokens only (what ``pad_batch`` takes), so
    :func:`mmrole.rl.logprobs.token_logprobs` gives the reply tokens' log-probs."""
    n_prompt = len(prompt["input_ids"])
    reply = np.asarray(list(reply_ids), dtype=np.int64)
    out: dict[str, Any] = {}
    for k, v in model_inputs(prompt).items():
        if isinstance(v, np.ndarray) and v.ndim == 1 and len(v) == n_prompt and k != "pixel_values":
            pad = reply if k == "input_ids" else np.zeros(len(reply), dtype=v.dtype)
            out[k] = np.concatenate([np.asarray(v), pad.astype(v.dtype)])
        else:
            out[k] = v
    labels = np.full(n_prompt + len(reply), IGNORE_INDEX, dtype=np.int64)
    labels[n_prompt:] = reply
    out["labels"] = labels
    out["num_target_tokens"] = len(reply)
    out["num_text_tokens"] = int(prompt.get("num_text_tokens", n_prompt)) + len(reply)
    return out
