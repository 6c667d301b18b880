"""Judges: a local VLM (reward model), with the image helpers every judge uses (the OpenAI-compatible endpoint
judge is :mod:`.openai_judge`).

Both follow :class:`mmrole.eval.contract.Judge`: per-request problems become failure results, never a crash of
the run; an unparsable reply is re-asked (with sampling, a new seed) up to ``max_retries`` times first.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

from .contract import B_ZERO_ERROR, JudgeRequest, JudgeResult, build_judge_sample, failure, result_from_reply
from .score_constraint import RowConstraint, ScoreGrammar
from .template import JudgeTemplate
from .template_loader import load_judge_template

log = logging.getLogger(__name__)


class JudgeConfigError(RuntimeError):
    """A problem no retry can fix (missing API key, 401/403/404 from the endpoint): stops the run."""


# ------------------------------------------------------------------------------------------ image helpers


def request_image_bytes(request: JudgeRequest, images_root: Optional[str]) -> bytes:
    """The image of a judge request: its embedded bytes, else the file under ``images_root`` (errors name it)."""
    from mmrole.data.images import ImageError, resolve_image_path

    if request.image_bytes is not None:
        return request.image_bytes
    if images_root is None:
        raise ImageError(f"{request.sample_id}: no images_root configured and no embedded image")
    path = resolve_image_path(images_root, request.image)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    return path.read_bytes()


def image_data_url(data: bytes, name: str = "<image>", max_pixels: Optional[int] = None) -> str:
    """A ``data:`` URL of the original bytes (no re-encoding); PNG/JPEG/GIF/WebP pass as is, other formats are
    re-encoded as PNG. Header-only check of format and size."""
    from PIL import Image

    from mmrole.data.images import DEFAULT_MAX_PIXELS, ImageError

    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").upper()
            w, h = im.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} exceeds the cap of {max_pixels} pixels")
            if fmt not in ("PNG", "JPEG", "GIF", "WEBP"):
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
                data, fmt = buf.getvalue(), "PNG"
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    return f"data:{Image.MIME[fmt]};base64,{base64.b64encode(data).decode('ascii')}"


# ---------------------------------------------------------------------------------------------- VLM judge


class VLMJudge:
    """A local reward model: any VLM of :mod:`mmrole.models` (``vlm.generate(samples, images, params)``).

    ``params`` is a :class:`mmrole.models.GenerationParams` (or any dataclass with ``do_sample``, ``temperature``
    and ``seed``); re-asks use ``do_sample=True``, ``retry_temperature`` when the first pass was greedy, and
    seed ``params.seed + attempt`` so each re-ask differs.
    """

    def __init__(
        self,
        vlm: Any,
        params: Any = None,
        max_retries: int = 2,
        *,
        template: Optional[JudgeTemplate] = None,
        images_root: Optional[str] = None,
        retry_temperature: float = 0.7,
        name: str = "vlm",
        image_loader: Optional[Callable[[JudgeRequest], Any]] = None,
        constrained_scores: bool = False,
    ):
        if params is None:
            from mmrole.models import GenerationParams  # lazy: keeps torch out of plain eval imports

            params = GenerationParams(max_new_tokens=512)
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.vlm = vlm
        self.params = params
        self.max_retries = max_retries
        self.template = template or load_judge_template()
        self.images_root = images_root
        self.retry_temperature = retry_temperature
        self.name = name
        self._image_loader = image_loader
        # judge.constrained_scores: the closing "[Scores]: (A, B)" line is decoded under a token mask
        self.score_grammar = score_grammar_for(vlm, params.max_new_tokens) if constrained_scores else None

    def _load_image(self, request: JudgeRequest):
        if self._image_loader is not None:
            return self._image_loader(request)
        from mmrole.data.images import load_image

        if request.image_bytes is not None:
            return load_image(self.images_root or ".", request.image, data=request.image_bytes)
        if self.images_root is None:
            raise ValueError(f"{request.sample_id}: VLMJudge needs images_root (or image_bytes in the request)")
        return load_image(self.images_root, request.image)

    def _retry_params(self, attempt: int):
        base_seed = getattr(self.params, "seed", None) or 0
        temperature = self.params.temperature if self.params.do_sample else self.retry_temperature
        return dataclasses.replace(self.params, do_sample=True, temperature=temperature, seed=base_seed + attempt)

    def _generate(self, prompts: list, params) -> list:
        """Replies for encoded prompts, in one batch; if the batch call raises a ``ValueError``, one by one, so a
        single bad prompt fails alone and the others are still scored. Per-prompt errors are returned, not raised;
        anything else (OOM, bugs) propagates."""
        extra = {}
        if self.score_grammar is not None:
            grammar = self.score_grammar
            extra["logits_processor"] = lambda: [ScoreLogitsProcessor(grammar, params.max_new_tokens)]
        try:
            out = self.vlm.generate_encoded(prompts, params, **extra)
        except ValueError as e:
            if len(prompts) == 1:
                return [e]
            log.warning("%s: batch generate failed (%s); retrying one by one", self.name, e)
            return [self._generate([p], params)[0] for p in prompts]
        if len(out) != len(prompts):
            raise RuntimeError(f"{self.name}: generate returned {len(out)} replies for {len(prompts)} prompts")
        return list(out)

    def score_batch(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        t0 = time.perf_counter()
        results: list[Optional[JudgeResult]] = [None] * len(requests)
        samples, images, idx = [], [], []
        cache: dict[str, Any] = {}  # the 8 metrics of a sample share one image
        for i, req in enumerate(requests):
            try:
                ck = req.image if req.image_bytes is None else f"{req.sample_id}:{req.image}"
                if ck not in cache:
                    cache[ck] = self._load_image(req)
                img = cache[ck]
            except Exception as e:  # an unusable image fails this request only
                results[i] = failure(req, f"image: {e}", judge=self.name)
                continue
            samples.append(build_judge_sample(req, self.template))
            images.append(img)
            idx.append(i)
        # Encoded once for every attempt; a prompt that cannot be encoded (too long for the judge even without
        # history) fails alone, and the rest of the batch is still generated together.
        prompts = self.vlm.encode_prompts(samples, images, self.params)
        todo = []
        for j, p in enumerate(prompts):
            if isinstance(p, Exception):
                results[idx[j]] = failure(requests[idx[j]], f"prompt: {type(p).__name__}: {p}", judge=self.name)
            else:
                todo.append(j)
        for attempt in range(self.max_retries + 1):
            if not todo:
                break
            params = self.params if attempt == 0 else self._retry_params(attempt)
            out = self._generate([prompts[j] for j in todo], params)
            still = []
            for j, text in zip(todo, out):
                i = idx[j]
                if isinstance(text, Exception):  # e.g. prompt too long for the model: not worth re-asking
                    results[i] = failure(
                        requests[i], f"generate: {type(text).__name__}: {text}", attempts=attempt + 1, judge=self.name
                    )
                    continue
                res = result_from_reply(requests[i], text, attempts=attempt + 1, judge=self.name)
                results[i] = res
                if not res.ok and res.error != B_ZERO_ERROR:
                    still.append(j)  # unparsable: ask again; a parsed B = 0 is a judgement, not a glitch
            todo = still
        for j in todo:  # still unparsable after every re-ask: a recorded failure, never a zero
            r = results[idx[j]]
            r.error = f"unparsable after {self.max_retries + 1} replies: {r.error}"
        elapsed = time.perf_counter() - t0
        for r in results:
            r.elapsed_s = elapsed / max(1, len(requests))
        return results  # type: ignore[return-value]


def score_grammar_for(vlm: Any, max_new_tokens: int) -> ScoreGrammar:
    """The closing-score-line grammar over ``vlm``'s tokenizer; ``ValueError`` when ``max_new_tokens`` cannot hold
    the line or the vocabulary cannot spell it."""
    tok = vlm.tokenizer
    # Each id decoded alone, without clean-up (which would turn " ," into ","): exactly what it adds to a reply.
    texts = tok.batch_decode([[i] for i in range(len(tok))], clean_up_tokenization_spaces=False)
    grammar = ScoreGrammar(texts, vlm.eos_token_ids())
    RowConstraint(grammar, max_new_tokens)  # checks max_new_tokens now, not on the first batch
    return grammar


class ScoreLogitsProcessor:
    """A transformers logits processor (``LogitsProcessor`` call protocol) for one ``generate`` call: per row, the
    free review, then the score line of ``grammar`` (see :mod:`mmrole.eval.score_constraint`). Other processors'
    ``-inf`` (e.g. ``min_new_tokens``) on a token the line needs is lifted to a finite floor, so a row never has
    every token masked."""

    FLOOR = -1e4

    def __init__(self, grammar: ScoreGrammar, max_new_tokens: int):
        self.grammar = grammar
        self.max_new_tokens = max_new_tokens
        self.rows: Optional[list[RowConstraint]] = None
        self.start = 0
        self._banned = None

    def __call__(self, input_ids, scores):
        import torch

        if self.rows is None:  # first step: input_ids is the prompt batch
            self.start = input_ids.shape[1]
            self.rows = [RowConstraint(self.grammar, self.max_new_tokens) for _ in range(input_ids.shape[0])]
            banned = [i for i in self.grammar.banned_in_review if i < scores.shape[-1]]
            self._banned = torch.tensor(banned, dtype=torch.long, device=scores.device)
        else:
            for row, t in zip(self.rows, input_ids[:, -1].tolist()):
                row.consume(t)
        n = input_ids.shape[1] - self.start
        top = scores.argmax(-1).tolist()
        out = scores.clone()
        for i, row in enumerate(self.rows):
            allowed = row.next_allowed(top[i], n)
            if allowed is None:
                out[i, self._banned] = -float("inf")
            else:
                idx = torch.tensor(allowed, dtype=torch.long, device=scores.device)
                out[i] = -float("inf")
                out[i, idx] = scores[i, idx].clamp(min=self.FLOOR)
        return out
