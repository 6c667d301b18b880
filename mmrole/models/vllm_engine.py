"""A local model served by vLLM with the interface of :class:`mmrole.models.vlm.VLM` that the answering and judging
workers use (``encode_prompts`` + ``generate_encoded``), so both engines see the same prompts.

Prompts are encoded by our :class:`SampleEncoder` (chat template, history-first truncation, control-token checks,
the same errors), then handed to vLLM as token ids with each image's expanded placeholder run collapsed back to one
``<|image_pad|>`` (vLLM expands it again from the image) and the PIL image itself; replies are cut at the same end
tokens and stop strings and decoded by the same tokenizer. vLLM is imported only here, lazily.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from mmrole.data.records import IMAGE_MARKER_PATTERN, Sample

from .config import GenerationParams, VLMConfig
from .engines import VLLMSettings, require_vllm

log = logging.getLogger(__name__)


def collapse_image_runs(ids: Sequence[int], image_token_id: int) -> list[int]:
    """Token ids with every run of ``image_token_id`` replaced by one such token (vLLM expands each from its
    image's grid)."""
    out: list[int] = []
    prev_image = False
    for t in ids:
        t = int(t)
        if t == image_token_id:
            if not prev_image:
                out.append(t)
            prev_image = True
        else:
            out.append(t)
            prev_image = False
    return out


def _generation_eos(model_path: str) -> list[int]:
    p = Path(model_path) / "generation_config.json"
    if not p.is_file():
        return []
    eos = json.loads(p.read_text()).get("eos_token_id")
    return [int(eos)] if isinstance(eos, int) else [int(x) for x in eos or []]


class VLLMEngine:
    """vLLM's offline ``LLM`` for one model (and its LoRA adapter, when ``model_path`` is an adapter dir or
    ``lora.adapter_path`` is set). ``generate_encoded`` takes what ``encode_prompts`` returned."""

    def __init__(self, cfg: VLMConfig, settings: Optional[VLLMSettings] = None):
        require_vllm("engine")
        import torch

        from .encoding import build_encoder
        from .loading import resolve_device, resolve_dtype
        from .processor import resolve_model_paths

        self.cfg = cfg
        self.settings = settings or VLLMSettings()
        proc_path, base_path = resolve_model_paths(cfg.model_path)
        adapter = cfg.model_path if base_path != cfg.model_path else (cfg.lora.adapter_path if cfg.lora else None)
        self.encoder = build_encoder(cfg)
        self.family = self.encoder.family
        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        on_gpu = device.type == "cuda"
        if not on_gpu:
            # vLLM's CPU backend reads these at engine start; the job's own values win.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.kv_cache_space_gb))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # replicas share the machine's cores
            # The engine core in this process, not a spawned one: each spawned process re-imports vLLM (about
            # 10 s a process on 2 cores); measured 42 s -> 11 s to start a tiny model. A GPU engine keeps its core
            # process (it overlaps scheduling with the GPU).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        s = self.settings
        self.max_model_len = int(s.max_model_len or cfg.max_length)
        # vLLM's processor reads the same preprocessor_config.json; only an explicit budget needs passing on
        mm_kwargs = {k: int(v) for k, v in (("min_pixels", cfg.min_pixels), ("max_pixels", cfg.max_pixels)) if v}
        kw: dict[str, Any] = dict(
            model=base_path,
            tokenizer=proc_path,
            dtype=str(dtype).replace("torch.", ""),
            max_model_len=self.max_model_len,
            max_num_seqs=s.max_num_seqs,
            tensor_parallel_size=s.tensor_parallel_size,
            enable_prefix_caching=s.enable_prefix_caching,
            enforce_eager=(not on_gpu) if s.enforce_eager is None else s.enforce_eager,
            seed=s.seed,
            trust_remote_code=cfg.trust_remote_code,
            limit_mm_per_prompt={"image": 4, "video": 0},
        )
        if mm_kwargs:
            kw["mm_processor_kwargs"] = mm_kwargs
        if on_gpu:
            kw["gpu_memory_utilization"] = s.gpu_memory_utilization
        elif s.tensor_parallel_size == 1:
            kw["distributed_executor_backend"] = "uni"  # the model runner in this process too (no worker process)
        self.lora_request = None
        if adapter or s.enable_lora:
            kw.update(enable_lora=True, max_loras=s.max_loras, max_lora_rank=s.max_lora_rank)
        if adapter:
            from vllm.lora.request import LoRARequest

            # id 1 is this adapter; the Serve app numbers its adapters from 2
            self.lora_request = LoRARequest(Path(adapter).name or "adapter", 1, str(adapter))
        kw.update(s.engine_kwargs)
        from vllm import LLM

        try:
            self.llm = LLM(**kw)
        except Exception as e:  # an engine that cannot start fails the job at once, naming the model and setting
            raise RuntimeError(f"vLLM could not start for model {cfg.model_path!r} (engine: vllm, {kw}): {e}") from e
        ids = list(self.encoder.end_token_ids)
        for t in _generation_eos(base_path):
            if t not in ids:
                ids.append(t)
        self.eos_ids = ids
        self.torch = torch

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def encode_prompts(
        self, samples: Sequence[Sample], images: Sequence[Any], params: Optional[GenerationParams] = None
    ) -> list:
        """As :meth:`VLM.encode_prompts` (the same encoder, reserve and per-sample errors); each prompt also
        carries the images it kept, for vLLM's own image processing."""
        params = params or GenerationParams()
        if len(samples) != len(images):
            raise ValueError(f"generate: {len(samples)} samples but {len(images)} images")
        reserve = min(params.max_new_tokens, self.cfg.max_length // 4)
        out: list = []
        for s, im in zip(samples, images):
            try:
                enc = self.encoder.encode(s, im, with_target=False, reserve=reserve)
            except ValueError as e:
                out.append(e)
                continue
            ims = [] if im is None else list(im) if isinstance(im, (list, tuple)) else [im]
            text = s.user_text_with_history(enc["history_kept"] if enc.get("history_dropped") else None)
            if IMAGE_MARKER_PATTERN.search(s.user_text_with_history(None)):  # images in dropped lines went too
                ims = [ims[int(m.group(1))] for m in IMAGE_MARKER_PATTERN.finditer(text)]
            enc["images"] = ims
            out.append(enc)
        return out

    def _prompt(self, enc: dict) -> dict:
        from vllm.inputs import TokensPrompt

        image_id = getattr(self.encoder, "image_token_id", None)
        ids = enc["input_ids"]
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"sample {enc.get('id')!r}: prompt of {len(ids)} tokens does not fit vllm.max_model_len "
                f"{self.max_model_len}"
            )
        ids = collapse_image_runs(ids, image_id) if image_id is not None else [int(t) for t in ids]
        prompt = TokensPrompt(prompt_token_ids=ids)
        if enc.get("images"):
            prompt["multi_modal_data"] = {"image": enc["images"] if len(enc["images"]) > 1 else enc["images"][0]}
        return prompt

    def sampling_params(self, params: GenerationParams, max_tokens: Optional[int] = None):
        from vllm import SamplingParams

        kw: dict[str, Any] = dict(
            max_tokens=max_tokens or params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            stop_token_ids=list(self.eos_ids),
            detokenize=False,  # decoded below by our tokenizer, as the HF path does
        )
        if params.do_sample:
            kw.update(temperature=params.temperature, top_p=params.top_p, seed=params.seed)
        else:
            kw.update(temperature=0.0)
        return SamplingParams(**kw)

    def decode(self, tokens: Sequence[int], params: GenerationParams) -> str:
        """New tokens -> reply text: cut at the first end token and at any stop string (as ``VLM._run_generate``)."""
        eos = set(self.eos_ids)
        row = list(tokens)
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        text = self.tokenizer.decode(row[:cut], skip_special_tokens=True)
        for s in params.stop or []:
            j = text.find(s)
            if j >= 0:
                text = text[:j]
        return text.strip()

    def generate_encoded(self, encoded: list[dict], params: Optional[GenerationParams] = None, **_ignored) -> list:
        """Replies for encoded prompts, in one vLLM call (continuous batching). A prompt vLLM refuses (too long
        for ``max_model_len``) gets its ``ValueError`` in its place; the others are generated."""
        params = params or GenerationParams()
        if not encoded:
            return []
        out: list = [None] * len(encoded)
        prompts, idx = [], []
        for i, e in enumerate(encoded):
            try:
                prompts.append(self._prompt(e))
                idx.append(i)
            except ValueError as err:
                out[i] = err
        if prompts:
            results = self.llm.generate(
                prompts, self.sampling_params(params), use_tqdm=False, lora_request=self.lora_request
            )
            for i, r in zip(idx, results):
                out[i] = self.decode(r.outputs[0].token_ids, params)
        return out

    def encode(self, sample: Sample, image: Any, with_target: bool = False, reserve: int = 0) -> dict:
        """One generation prompt (as :meth:`VLM.encode`, raising the same errors), carrying its images."""
        if with_target:
            raise ValueError("VLLMEngine encodes generation prompts only")
        enc = self.encoder.encode(sample, image, with_target=False, reserve=reserve)
        ims = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        if IMAGE_MARKER_PATTERN.search(sample.user_text_with_history(None)):
            text = sample.user_text_with_history(enc["history_kept"] if enc.get("history_dropped") else None)
            ims = [ims[int(m.group(1))] for m in IMAGE_MARKER_PATTERN.finditer(text)]
        enc["images"] = ims
        return enc

    def generate_steps(
        self,
        encoded: Sequence[dict],
        params: Sequence[GenerationParams],
        on_tokens: Optional[Any] = None,
        cancelled: Optional[Any] = None,
        lora_requests: Optional[Sequence[Any]] = None,
    ) -> list[str]:
        """Rows with their own decoding settings in one continuous batch, step by step: ``on_tokens(i, token_ids)``
        after each step that gave row ``i`` new tokens (streaming); a row for which ``cancelled(i)`` is true is
        aborted (its client went away). Returns each row's reply (cut and decoded as :meth:`decode`)."""
        import itertools

        eng = self.llm.llm_engine
        self._ids = getattr(self, "_ids", itertools.count())
        rid_of: dict[str, int] = {}
        final: list[Optional[list[int]]] = [None] * len(encoded)
        for i, (e, p) in enumerate(zip(encoded, params)):
            rid = f"mmrole-{next(self._ids)}"
            lora = lora_requests[i] if lora_requests is not None else self.lora_request
            eng.add_request(rid, self._prompt(e), self.sampling_params(p), lora_request=lora)
            rid_of[rid] = i
        live = dict(rid_of)
        while eng.has_unfinished_requests():
            for out in eng.step():
                i = rid_of.get(out.request_id)
                if i is None:
                    continue
                toks = list(out.outputs[0].token_ids)
                if on_tokens is not None:
                    on_tokens(i, toks)
                if out.finished:
                    final[i] = toks
                    live.pop(out.request_id, None)
            if cancelled is not None:
                gone = [rid for rid, i in live.items() if cancelled(i)]
                if gone:
                    eng.abort_request(gone)
                    for rid in gone:
                        live.pop(rid)
        return [self.decode(t or [], p) for t, p in zip(final, params)]

    def generate(
        self, samples: Sequence[Sample], images: Sequence[Any], params: Optional[GenerationParams] = None
    ) -> list:
        """Reply text per sample (as :meth:`VLM.generate`)."""
        encoded = self.encode_prompts(samples, images, params)
        for e in encoded:
            if isinstance(e, ValueError):
                raise e
        return self.generate_encoded(encoded, params)


def build_engine(cfg: VLMConfig, engine: str = "hf", vllm: Optional[VLLMSettings] = None):
    """The generation engine of a local model: :class:`VLM` (``hf``) or :class:`VLLMEngine` (``vllm``)."""
    if engine == "vllm":
        return VLLMEngine(cfg, vllm)
    from .vlm import build_vlm

    return build_vlm(cfg)
