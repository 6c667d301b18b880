"""Samples -> model inputs: chat formatting, label masking and the history-first truncation policy (padding: :mod:`.batching`).

The encoder needs only the processor (no weights), so a Ray Data worker can encode rows without loading the model.
Per-sample outputs are plain numpy arrays and Python scalars, so they travel between processes as Arrow rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from mmrole.data.records import IMAGE_MARKER_PATTERN, Sample

from .batching import IGNORE_INDEX, pad_encoded
from .config import NATIVE_FAMILIES

# Qwen's control tokens: sample text containing them would be read as structure (an injected turn, or an image
# placeholder with no image features behind it), so such samples are refused. The order is that of their ids in
# Qwen's vocabulary (the tiny test models take their first ids from it).
CONTROL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


class SampleRejected(ValueError):
    """A sample that cannot be encoded; the message names the sample id."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


class SampleTooLong(SampleRejected):
    """Prompt + target exceed ``max_length`` even with the whole dialogue history dropped."""

    def __init__(self, sample_id: str, length: int, max_length: int, history_lines: int):
        dropped = f"with all {history_lines} history line(s) dropped" if history_lines else "(no history to drop)"
        super().__init__(
            sample_id, f"too long: {length} tokens {dropped} > max_length {max_length} (the target is never cut)"
        )
        self.length = length
        self.max_length = max_length


@dataclass
class Rejected:
    """A sample left out of a batch, and why."""

    id: str
    reason: str
    length: Optional[int] = None


@dataclass
class EncodeStats:
    """Counters an encoder keeps over its lifetime (for logs and metrics)."""

    encoded: int = 0
    history_shortened: int = 0  # samples that fit only after dropping old history lines
    history_lines_dropped: int = 0
    rejected_too_long: int = 0
    rejected_other: int = 0
    text_tokens: int = 0
    image_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Rendered:
    prompt: str  # everything before the reply (ends with the assistant header)
    reply: str  # target + end marker (supervised); empty when encoding for generation
    trailer: str = ""  # template text after the end marker (e.g. "\n"): in the input, not supervised


class SampleEncoder:
    """Turns :class:`Sample` + image into token ids, labels and vision inputs for one processor."""

    def __init__(self, processor: Any, family: str, max_length: int = 4096, chat_template: Optional[str] = None):
        self.processor = processor
        self.family = family
        self.max_length = int(max_length)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat_template = (
            chat_template or getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        )
        if not self.chat_template:
            raise ValueError(f"the processor of this {family} model has no chat template; pass chat_template=")
        self.native = family in NATIVE_FAMILIES
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:  # some tokenizers have no pad token; padded positions are masked anyway
            self.pad_token_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.stats = EncodeStats()
        self._end_marker = self._find_end_marker()
        self.end_token_ids = self._end_ids()
        if self.native:
            ip = processor.image_processor
            self.merge_size = int(ip.merge_size)
            self.image_token = getattr(processor, "image_token", "<|image_pad|>")
            self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(self.image_token))
            self.video_token_id = int(
                self.tokenizer.convert_tokens_to_ids(getattr(processor, "video_token", "<|video_pad|>"))
            )

    # ---- chat formatting -------------------------------------------------------------------------------------
    @staticmethod
    def messages(
        sample: Sample, user_text: str, target: Optional[str] = None, with_image: bool | int = True
    ) -> list[dict]:
        """system = the sample's system prompt; user = image(s) + text; assistant = target (when given).

        ``with_image`` is a flag or a number of images. Without image markers in ``user_text`` the images come
        first, then the text (the MMRole layout); with markers (``image_marker``), each image is where its marker
        is."""
        msgs: list[dict] = []
        if sample.system:
            msgs.append({"role": "system", "content": sample.system})
        if IMAGE_MARKER_PATTERN.search(user_text):
            content: list[dict] = []
            pos = 0
            for m in IMAGE_MARKER_PATTERN.finditer(user_text):
                if m.start() > pos:
                    content.append({"type": "text", "text": user_text[pos : m.start()]})
                content.append({"type": "image"})
                pos = m.end()
            if pos < len(user_text):
                content.append({"type": "text", "text": user_text[pos:]})
        else:
            content = [{"type": "image"}] * int(with_image) + [{"type": "text", "text": user_text}]
        msgs.append({"role": "user", "content": content})
        if target is not None:
            msgs.append({"role": "assistant", "content": target})
        return msgs

    def render(self, msgs: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            msgs, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _find_end_marker(self) -> str:
        # Render a probe conversation and read what the template writes after the assistant content: that is the
        # end-of-turn marker ("<|im_end|>" for Qwen). It is supervised, so the model learns to stop.
        probe = "PROBE-REPLY-7731"
        text = self.render(
            [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": probe}]
        )
        tail = text[text.rfind(probe) + len(probe) :]
        marker = tail.rstrip()
        if not marker:  # template closes turns with nothing: fall back to the tokenizer's eos
            marker = self.tokenizer.eos_token or ""
        return marker

    def _end_ids(self) -> list[int]:
        ids: list[int] = []
        marker_ids = self.tokenizer(self._end_marker, add_special_tokens=False)["input_ids"] if self._end_marker else []
        if len(marker_ids) == 1:
            ids.append(int(marker_ids[0]))
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(int(self.tokenizer.eos_token_id))
        return ids

    def _render_parts(self, sample: Sample, user_text: str, target: Optional[str], with_image: int) -> _Rendered:
        if target is None:
            msgs = self.messages(sample, user_text, with_image=with_image)
            return _Rendered(self.render(msgs, add_generation_prompt=True), "")
        full = self.render(self.messages(sample, user_text, target, with_image=with_image))
        idx = full.rfind(target)
        if idx < 0:  # the template rewrote the reply (e.g. stripped it); we cannot align labels safely
            raise SampleRejected(sample.id, "the chat template does not reproduce the target text verbatim")
        tail = full[idx + len(target) :]
        marker = tail.rstrip()
        trailer = tail[len(marker) :]
        if not marker:
            marker = self._end_marker
        return _Rendered(full[:idx], target + marker, trailer)

    def _check_text(self, sample: Sample, target: Optional[str]) -> None:
        texts = [sample.system, sample.user_text] + ([target] if target is not None else [])
        for t in texts:
            for tok in CONTROL_TOKENS:
                if t and tok in t:
                    raise SampleRejected(sample.id, f"text contains the control token {tok}")

    # ---- encoding --------------------------------------------------------------------------------------------
    def encode(self, sample: Sample, image: Any, with_target: bool = True, reserve: int = 0) -> dict:
        """One sample -> ``input_ids``, ``labels`` (with_target), vision inputs, per-token type ids and counts.

        ``image`` is a PIL image, None for a text-only prompt (e.g. a text-only judge call), or a list of images:
        each goes where its ``image_marker(i)`` is in the user text (all first, in order, when there is none);
        ``pixel_values`` are concatenated and ``image_grid_thw`` has one row per image, in prompt order.

        If prompt + target (+ ``reserve`` tokens, e.g. for generation) exceed ``max_length``, the oldest history
        lines are dropped first; if it still does not fit, :class:`SampleTooLong` is raised (never a silent cut).
        """
        try:
            enc = self._encode(sample, image, with_target, reserve)
        except SampleTooLong:
            self.stats.rejected_too_long += 1
            raise
        except SampleRejected:
            self.stats.rejected_other += 1
            raise
        s = self.stats
        s.encoded += 1
        s.text_tokens += enc["num_text_tokens"]
        s.image_tokens += enc["num_image_tokens"]
        if enc["history_dropped"]:
            s.history_shortened += 1
            s.history_lines_dropped += enc["history_dropped"]
        return enc

    def _encode(self, sample: Sample, image: Any, with_target: bool, reserve: int) -> dict:
        target = None
        if with_target:
            target = (sample.target or "").strip()
            if not target:
                raise SampleRejected(sample.id, "empty target")
        self._check_text(sample, target)
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        marked = self._check_markers(sample, sample.user_text_with_history(None), len(images))
        # Each image is processed once per sample, not once per history-shortening attempt.
        vision = [self._vision_inputs(sample, im, i, len(images)) for i, im in enumerate(images)] if self.native else []

        def build(keep: Optional[int]) -> dict:
            # Images whose marker sits in a dropped history line are dropped with it.
            text = sample.user_text_with_history(keep)
            kept = [int(m.group(1)) for m in IMAGE_MARKER_PATTERN.finditer(text)] if marked else range(len(images))
            parts = self._render_parts(sample, text, target, len(kept))
            return self._tokenize(
                sample, parts, [images[i] for i in kept], [vision[i] for i in kept] if self.native else []
            )

        n_hist = len(sample.history_lines) if (sample.prompt_head or sample.prompt_tail) else 0
        budget = self.max_length - int(reserve)
        enc = build(None)
        kept = n_hist
        if len(enc["input_ids"]) > budget:
            shortest = build(0) if n_hist else enc
            if len(shortest["input_ids"]) > budget:
                raise SampleTooLong(sample.id, len(shortest["input_ids"]) + int(reserve), self.max_length, n_hist)
            # Binary search for the most recent history lines that still fit (length grows with lines kept).
            lo, hi, best = 0, n_hist - 1, shortest
            kept = 0
            while lo <= hi:
                mid = (lo + hi) // 2
                cand = build(mid)
                if len(cand["input_ids"]) <= budget:
                    best, kept, lo = cand, mid, mid + 1
                else:
                    hi = mid - 1
            enc = best
        enc["id"] = sample.id
        enc["history_kept"] = kept
        enc["history_dropped"] = n_hist - kept
        return enc

    @staticmethod
    def _check_markers(sample: Sample, text: str, n_images: int) -> bool:
        """Whether the whole user text places its images with markers; if it does, every image once, in order."""
        marked = [int(m.group(1)) for m in IMAGE_MARKER_PATTERN.finditer(text)]
        if marked and marked != list(range(n_images)):
            raise SampleRejected(
                sample.id, f"the text marks images {marked[:8]} but the sample has {n_images} image(s)"
            )
        return bool(marked)

    def _vision_inputs(self, sample: Sample, image: Any, index: int = 0, count: int = 1) -> dict:
        try:
            out = self.processor.image_processor(images=[image], return_tensors="np")
        except Exception as e:  # name the sample: processor errors alone do not say which row failed
            which = f"image {index}: " if count > 1 else ""
            raise SampleRejected(sample.id, f"{which}image processing failed ({type(e).__name__}: {e})") from e
        grid = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
        return {
            "pixel_values": np.ascontiguousarray(out["pixel_values"], dtype=np.float32),
            "image_grid_thw": grid,
            "num_image_tokens": int(grid.prod(axis=1).sum()) // (self.merge_size**2),
        }

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        raw = getattr(self.tokenizer, "backend_tokenizer", None) if self.native else None
        # Qwen tokenizers are plain byte-level BPE: calling the Rust tokenizer directly gives the same ids at about
        # half the cost of the HF wrapper. Other tokenizers may add behaviour in the wrapper, so they go through it.
        if raw is not None:
            return [raw.encode(t, add_special_tokens=False).ids if t else [] for t in texts]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _tokenize(self, sample: Sample, parts: _Rendered, images: list, vision: list[dict]) -> dict:
        if self.native:
            # Split the prompt at the image placeholders and insert each image's expanded tokens ourselves.
            pieces = parts.prompt.split(self.image_token)
            if len(pieces) != len(vision) + 1:
                raise SampleRejected(
                    sample.id, f"expected {len(vision)} image placeholder(s) in the prompt, found {len(pieces) - 1}"
                )
            ids = self._token_ids(pieces + [parts.reply, parts.trailer])
            prompt_ids = list(ids[0])
            for v, piece_ids in zip(vision, ids[1 : len(pieces)]):
                prompt_ids += [self.image_token_id] * v["num_image_tokens"] + piece_ids
            n_img = sum(v["num_image_tokens"] for v in vision)
            extra_seq: dict[str, np.ndarray] = {}
            extra_img = {}
            if len(vision) == 1:
                extra_img = {"pixel_values": vision[0]["pixel_values"], "image_grid_thw": vision[0]["image_grid_thw"]}
            elif vision:
                extra_img = {k: np.concatenate([v[k] for v in vision]) for k in ("pixel_values", "image_grid_thw")}
        else:
            # Generic processors expand their own image placeholders; the reply and trailer carry no images.
            try:
                out = self.processor(
                    text=[parts.prompt],
                    images=list(images) or None,
                    return_tensors="np",
                    add_special_tokens=False,
                )
            except Exception as e:
                raise SampleRejected(sample.id, f"processor failed ({type(e).__name__}: {e})") from e
            prompt_ids = [int(x) for x in np.asarray(out["input_ids"])[0]]
            rest = self._token_ids([parts.reply, parts.trailer])
            ids = [None, rest[0], rest[1]]
            image_tok = getattr(self.processor, "image_token_id", None)
            n_img = sum(1 for t in prompt_ids if t == image_tok) if image_tok is not None else 0
            extra_seq, extra_img = {}, {}
            for k, v in out.items():
                if k in ("input_ids", "attention_mask"):
                    continue
                arr = np.asarray(v)
                if arr.ndim == 2 and arr.shape == (1, len(prompt_ids)):  # per-token (e.g. mm_token_type_ids)
                    extra_seq[k] = arr[0]
                else:
                    extra_img[k] = arr.astype(np.float32) if arr.dtype == np.float64 else arr
        reply_ids, trailer_ids = ids[-2] if parts.reply else [], ids[-1] if parts.trailer else []
        input_ids = np.asarray(prompt_ids + reply_ids + trailer_ids, dtype=np.int64)
        n = len(input_ids)
        enc: dict[str, Any] = {"input_ids": input_ids}
        if parts.reply:
            labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
            labels[len(prompt_ids) : len(prompt_ids) + len(reply_ids)] = reply_ids
            enc["labels"] = labels
        if self.native:
            # Token types (0 text, 1 image, 2 video) drive the 3-D M-RoPE positions; transformers 5 requires them
            # for every Qwen-VL family when pixel inputs are given.
            tt = np.zeros(n, dtype=np.int64)
            tt[input_ids == self.image_token_id] = 1
            tt[input_ids == self.video_token_id] = 2
            enc["mm_token_type_ids"] = tt
        for k, v in extra_seq.items():
            enc[k] = np.concatenate([v, np.zeros(n - len(v), dtype=v.dtype)])
        enc.update(extra_img)
        enc["num_image_tokens"] = int(n_img)
        enc["num_text_tokens"] = int(n - n_img)
        enc["num_target_tokens"] = len(reply_ids)
        return enc

    # ---- batching --------------------------------------------------------------------------------------------
    def pad_batch(
        self, encoded: Sequence[dict], padding_side: str = "right", pad_to_multiple_of: Optional[int] = None
    ) -> dict:
        """:func:`.batching.pad_encoded` with this tokenizer's pad id: torch tensors ready for ``model(**batch)``.
        Right padding for training, left for generation."""
        return pad_encoded(encoded, self.pad_token_id, padding_side, pad_to_multiple_of)

    def collate(
        self, samples: Sequence[Sample], images: Sequence[Any], with_target: bool = True, padding_side: str = "right"
    ) -> tuple[Optional[dict], list[Rejected]]:
        """Encode and pad; samples that cannot be encoded are returned in ``rejected`` (id + reason) and left out
        of the batch. The batch is ``None`` if every sample was rejected."""
        if len(samples) != len(images):
            raise ValueError(f"collate: {len(samples)} samples but {len(images)} images")
        encoded, rejected = [], []
        for s, im in zip(samples, images):
            try:
                encoded.append(self.encode(s, im, with_target=with_target))
            except SampleTooLong as e:
                rejected.append(Rejected(s.id, e.reason, e.length))
            except SampleRejected as e:
                rejected.append(Rejected(s.id, e.reason))
        batch = self.pad_batch(encoded, padding_side=padding_side) if encoded else None
        return batch, rejected


def build_encoder(cfg) -> SampleEncoder:
    """A weight-free :class:`SampleEncoder` for a :class:`VLMConfig` (what a data worker needs): same processor,
    family, pixel budget and ``max_length`` as :func:`build_vlm` would use. Works for adapter dirs too."""
    from .processor import build_processor, resolve_family, resolve_model_paths

    proc_path, base = resolve_model_paths(cfg.model_path)
    family = resolve_family(base, cfg.family, cfg.trust_remote_code)
    processor = build_processor(proc_path, family, cfg.min_pixels, cfg.max_pixels, cfg.trust_remote_code)
    return SampleEncoder(processor, family, cfg.max_length)
