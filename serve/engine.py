"""The batched model of a Serve replica, usable without Ray: :class:`Engine` (one base model, LoRA adapters on it),
the rows the batcher decodes (:class:`Job`, :class:`Row`) and the token stream of a streamed row
(:class:`TokenSink`, fed from the generation thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from mmrole.serving import RequestError, apply_stops, params_key


def materialize_model_path(model: dict) -> tuple[dict, Optional[str]]:
    """``model_path: tiny:<family>`` -> a freshly written tiny random-weight model in a temp dir (CPU demos and
    tests need no download). Returns the VLMConfig dict and the temp dir to delete later (or None)."""
    cfg = dict(model)
    path = str(cfg.get("model_path", ""))
    if not path.startswith("tiny:"):
        return cfg, None
    from mmrole.models import make_tiny_vlm

    tmp = tempfile.mkdtemp(prefix="mmrole-tiny-")
    make_tiny_vlm(tmp, family=path[5:] or "qwen2_5_vl", seed=0)
    cfg["model_path"] = tmp
    return cfg, tmp


class TokenSink:
    """Where a streamed row's text goes, step by step: the generation thread calls :meth:`push` with the reply so
    far; the request's event loop reads ``queue`` (``("text", str)``, then ``("end", None)`` or
    ``("error", exc)``). ``cancelled`` (set when the client goes away) makes the row stop decoding."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def _put(self, item: tuple) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def push(self, text: str) -> None:
        self._put(("text", text))

    def end(self) -> None:
        self._put(("end", None))

    def fail(self, exc: BaseException) -> None:
        self._put(("error", exc))


class _RowStreamer:
    """A transformers streamer over a whole batch: keeps each row's new tokens and pushes each streamed row's
    decoded text (cut at the end token and at stop strings) to its :class:`TokenSink`."""

    def __init__(self, tokenizer, eos_ids: Sequence[int], sinks: Sequence[Optional[TokenSink]], stops: Sequence):
        self.tokenizer = tokenizer
        self.eos = set(int(e) for e in eos_ids)
        self.sinks = list(sinks)
        self.stops = [list(s or []) for s in stops]
        self.tokens: list[list[int]] = [[] for _ in sinks]
        self.done = [False] * len(sinks)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate first sends the prompt ids
            self.prompt_seen = True
            return
        step = value.reshape(-1).tolist()
        for i, tok in enumerate(step):
            if self.done[i]:
                continue
            if tok in self.eos:
                self.done[i] = True
                continue
            self.tokens[i].append(int(tok))
            sink = self.sinks[i]
            if sink is None:
                continue
            text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True).lstrip()
            if text.endswith("\ufffd"):  # a character split over tokens: wait for its last byte
                continue
            cut = apply_stops(text, self.stops[i])
            if cut != text:
                self.done[i] = True
            sink.push(cut)

    def end(self) -> None:
        pass


def _cancel_criteria(sinks: Sequence[Optional[TokenSink]]):
    """A stopping criterion that ends the rows whose client went away (the batch stops when all rows are done)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class ClientGone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            flags = [bool(s is not None and s.cancelled) for s in sinks]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([ClientGone()])


class Engine:
    """A loaded VLM that encodes one request at a time and decodes many together; no Ray involved, so the
    benchmark can call it in-process to measure what Serve adds."""

    def __init__(self, vlm: Any, name: str, tmp_dir: Optional[str] = None):
        self.vlm = vlm
        self.name = name
        self._tmp_dir = tmp_dir
        self.pool: Optional[AdapterPool] = None  # LoRA adapters on this base (set by the app)

    @classmethod
    def load(
        cls,
        model: dict,
        name: str,
        torch_threads: Optional[int] = None,
        engine: str = "hf",
        vllm: Optional[dict] = None,
    ) -> Engine:
        import torch

        from mmrole.models import VLMConfig, build_vlm

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        cfg, tmp = materialize_model_path(model)
        if engine == "vllm":
            from mmrole.models.engines import VLLMSettings
            from mmrole.models.vllm_engine import VLLMEngine

            if tmp:  # vLLM's CPU attention needs head_dim >= 32: a wider tiny model
                from mmrole.models import make_tiny_vlm

                make_tiny_vlm(tmp, family=str(model["model_path"])[5:] or "qwen2_5_vl", seed=0, hidden=128)
            return VLLMServeEngine(VLLMEngine(VLMConfig.from_dict(cfg), VLLMSettings(**(vllm or {}))), name, tmp)
        vlm = build_vlm(VLMConfig.from_dict(cfg))
        return cls(vlm, name, tmp)

    @property
    def max_length(self) -> int:
        return self.vlm.cfg.max_length

    def encode(self, sample, image, params, param: str) -> dict:
        """Prompt tokens + vision inputs; too long or unusable prompts -> 400 naming ``param``.

        The room kept for the reply is the same as in offline ``VLM.generate`` (so serving drops the same
        history lines as the offline jobs)."""
        from mmrole.models import SampleRejected, SampleTooLong

        reserve = min(params.max_new_tokens, self.max_length // 4)
        try:
            return self.vlm.encode(sample, image, with_target=False, reserve=reserve)
        except SampleTooLong as e:
            raise RequestError(
                400,
                f"'{param}': the prompt is too long for the model even with the whole history "
                f"dropped ({e.length} tokens with the reply budget > {e.max_length})",
                param,
                "context_length_exceeded",
            )
        except SampleRejected as e:
            raise RequestError(400, f"'{param}': {e.reason}", param, "rejected_input")

    def generate(
        self, encoded: Sequence[dict], params: Sequence[Any], sinks: Optional[Sequence[Optional[TokenSink]]] = None
    ) -> list[str]:
        """Reply texts in input order. Rows whose decoding settings match run as one padded batch; stop strings
        are applied per row afterwards, so rows with different stops still share a batch. Rows with a
        :class:`TokenSink` get their text step by step while the batch decodes."""
        sinks = list(sinks) if sinks is not None else [None] * len(encoded)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(params_key(p), []).append(i)
        out: list[str] = [""] * len(encoded)
        for idx in groups.values():
            p = dataclasses.replace(params[idx[0]], stop=None)
            group_sinks = [sinks[i] for i in idx]
            kw = {}
            if any(s is not None for s in group_sinks):
                kw["streamer"] = _RowStreamer(
                    self.vlm.tokenizer, self.eos_ids(), group_sinks, [params[i].stop for i in idx]
                )
                kw["stopping_criteria"] = _cancel_criteria(group_sinks)
            texts = self.vlm.generate_encoded([encoded[i] for i in idx], p, **kw)
            for i, t in zip(idx, texts):
                out[i] = apply_stops(t, params[i].stop)
        return out

    def eos_ids(self) -> list[int]:
        """End-of-reply token ids (the generation config's, else the tokenizer's)."""
        ids = [int(t) for t in self.vlm.encoder.end_token_ids]
        gc_eos = getattr(self.vlm.model.generation_config, "eos_token_id", None)
        for t in [gc_eos] if isinstance(gc_eos, int) else (gc_eos or []):
            if int(t) not in ids:
                ids.append(int(t))
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.vlm.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def close(self) -> None:
        self.vlm = None
        if self._tmp_dir:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __del__(self):  # called by Serve's multiplexer on eviction
        self.close()


class VLLMServeEngine(Engine):
    """``engine: vllm``: the replica's model on vLLM. Rows of a batch decode in one continuous batch with their own
    decoding settings; streamed rows get their text after every engine step; a row whose client left is aborted.
    LoRA adapters (``adapters``) are vLLM LoRA requests on the one base model (no peft pool)."""

    def __init__(self, vlm: Any, name: str, tmp_dir: Optional[str] = None):
        super().__init__(vlm, name, tmp_dir)
        self.lora_paths: dict[str, str] = {}
        self._lora_requests: dict[str, Any] = {}

    def lora_request(self, adapter: Optional[str]):
        if adapter is None:
            return self.vlm.lora_request
        if adapter not in self._lora_requests:
            from vllm.lora.request import LoRARequest

            self._lora_requests[adapter] = LoRARequest(adapter, len(self._lora_requests) + 2, self.lora_paths[adapter])
        return self._lora_requests[adapter]

    def generate(
        self,
        encoded: Sequence[dict],
        params: Sequence[Any],
        sinks: Optional[Sequence[Optional[TokenSink]]] = None,
        adapter: Optional[str] = None,
    ) -> list[str]:
        sinks = list(sinks) if sinks is not None else [None] * len(encoded)
        tok = self.vlm.tokenizer
        eos = set(self.vlm.eos_ids)

        def on_tokens(i: int, toks: list[int]) -> None:
            sink = sinks[i]
            if sink is None:
                return
            cut = next((k for k, t in enumerate(toks) if t in eos), len(toks))
            text = tok.decode(toks[:cut], skip_special_tokens=True).lstrip()
            if text and not text.endswith("\ufffd"):  # a character split over tokens: wait for its last byte
                sink.push(apply_stops(text, params[i].stop))

        plain = [dataclasses.replace(p, stop=None) for p in params]
        lora = [self.lora_request(adapter)] * len(encoded)
        texts = self.vlm.generate_steps(
            encoded, plain, on_tokens, lambda i: sinks[i] is not None and sinks[i].cancelled, lora
        )
        return [apply_stops(t, p.stop) for t, p in zip(texts, params)]

    def eos_ids(self) -> list[int]:
        return list(self.vlm.eos_ids)


def is_lora_dir(path: str) -> bool:
    """A peft LoRA adapter dir (served on the base model) rather than a full model (served as its own engine)."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


class AdapterPool:
    """LoRA adapters on one base model (peft ``load_adapter`` / ``set_adapter``), least recently used evicted when
    more than ``max_count`` are loaded or their weights exceed ``max_bytes``. Each adapter costs its own weights,
    not another copy of the base. Not thread-safe: every call runs on the generation thread, between batches."""

    def __init__(self, engine: Engine, paths: dict[str, str], max_count: int, max_bytes: Optional[int] = None):
        self.engine = engine
        self.paths = dict(paths)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> bytes of its weights, oldest first
        self.loads = 0
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return sum(self.loaded.values())

    def activate(self, name: Optional[str]) -> None:
        """Make ``name`` the active adapter (loading it, evicting others first), or the bare base when None."""
        if name is None:
            if self.loaded:
                self.engine.vlm.model.base_model.disable_adapter_layers()
            return
        if name not in self.loaded:
            self._load(name)
        self.loaded.move_to_end(name)
        model = self.engine.vlm.model
        model.base_model.enable_adapter_layers()
        model.set_adapter(name)

    def _load(self, name: str) -> None:
        from peft import PeftModel

        while self.loaded and len(self.loaded) >= self.max_count:
            self._evict()
        vlm = self.engine.vlm
        if not hasattr(vlm.model, "peft_config"):  # the first adapter wraps the base model (no weights copied)
            vlm.model = PeftModel.from_pretrained(vlm.model, self.paths[name], adapter_name=name)
        else:
            vlm.model.load_adapter(self.paths[name], adapter_name=name)
        vlm.model.eval()
        size = sum(p.numel() * p.element_size() for n, p in vlm.model.named_parameters() if f".{name}." in n)
        self.loaded[name] = size
        self.loads += 1
        while self.max_bytes is not None and self.bytes > self.max_bytes and len(self.loaded) > 1:
            self._evict()

    def _evict(self) -> None:
        old, _ = self.loaded.popitem(last=False)
        model = self.engine.vlm.model
        if self.loaded:
            model.set_adapter(next(reversed(self.loaded)))  # peft refuses to delete the active adapter
        model.delete_adapter(old)
        self.evictions += 1

    def snapshot(self) -> dict:
        return {
            "loaded": list(self.loaded),
            "bytes": self.bytes,
            "max_count": self.max_count,
            "max_bytes": self.max_bytes,
            "loads": self.loads,
            "evictions": self.evictions,
        }


@dataclass
class Job:
    """One decoding row submitted to the batcher. ``prepare`` (image decoding + encoding) runs on the gen thread
    right before the batch decodes; it may raise :class:`RequestError`, which fails this row only. ``sink`` set:
    the row streams."""

    engine: Engine
    prepare: Callable[[], dict]
    params: Any
    encoded: Optional[dict] = None  # set by prepare (kept for re-asks)
    sink: Optional[TokenSink] = field(default=None)
    adapter: Optional[str] = None  # a LoRA adapter of the engine's pool (None: the base model)


@dataclass
class Row:
    """What the batcher returns for one job."""

    text: str
    batch_size: int
    prompt_tokens: int
    completion_tokens: int
    history_dropped: int
