"""The VLM wrapper (any ``AutoModelForImageTextToText``): encoding, batching, batched and shared-prefix
generation, saving; building one from a config, and merging LoRA."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mmrole.data.records import Sample

from .config import (
    NATIVE_FAMILIES,
    GenerationParams,
    LoRASettings,
    VLMConfig,
)
from .encoding import Rejected, SampleEncoder
from .loading import apply_lora, freeze_parts, quantization_config, resolve_device, resolve_dtype
from .prefix_groups import plan_prefix_groups
from .processor import build_processor, resolve_family, resolve_model_paths, save_processor
from .shared_prefix import shared_prefix_cache, shared_prefix_decoding

log = logging.getLogger(__name__)


class VLM:
    """A loaded model + processor + encoder: samples in, tensors / reply text out."""

    def __init__(self, model, processor, family: str, cfg: VLMConfig, device: torch.device):
        self.model = model
        self.processor = processor
        self.family = family
        self.cfg = cfg
        self.device = device
        self.encoder = SampleEncoder(processor, family, cfg.max_length)

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    # ---- encoding (delegates to the weight-free encoder) -----------------------------------------------------
    def encode(self, sample: Sample, image, with_target: bool = True, reserve: int = 0) -> dict:
        """See :meth:`SampleEncoder.encode`; raises :class:`SampleTooLong` naming the sample."""
        return self.encoder.encode(sample, image, with_target=with_target, reserve=reserve)

    def pad_batch(
        self, encoded: list[dict], padding_side: str = "right", pad_to_multiple_of: Optional[int] = None
    ) -> dict[str, torch.Tensor]:
        """Dynamic padding (right for training, left for generation); concatenates vision inputs."""
        return self.encoder.pad_batch(encoded, padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of)

    def collate(self, samples: Sequence[Sample], images: Sequence[Any]) -> tuple[Optional[dict], list[Rejected]]:
        """Encode + right-pad for training; too-long/bad samples are returned as :class:`Rejected`."""
        return self.encoder.collate(samples, images)

    def pack_batch(self, encoded: list[dict]) -> dict:
        """Pack encoded training samples into ONE row without padding (native Qwen families only).

        Each segment gets its own M-RoPE positions (computed by the model's ``get_rope_index``) and a text
        position row that restarts at 0; with no 2-D attention mask, transformers turns those restarts into a
        block-diagonal causal mask, so segments do not attend to each other (sdpa, eager and flash-attention).
        Labels of each segment's first token are -100 (prompt), so no loss crosses a boundary. The batch carries
        ``use_cache=False``: with a cache, transformers would not build the packed mask."""
        if self.family not in NATIVE_FAMILIES:
            raise ValueError(f"packing is implemented for {NATIVE_FAMILIES}, not {self.family!r}")
        if not encoded or any("labels" not in e for e in encoded):
            raise ValueError("pack_batch: needs encoded training samples (with labels)")
        core = self.model.get_base_model() if self.is_peft else self.model
        rope_model = core.model  # Qwen*VLModel holds get_rope_index
        text_pos, mrope = [], []
        for e in encoded:
            ids = torch.as_tensor(e["input_ids"])[None]
            tt = torch.as_tensor(e["mm_token_type_ids"])[None]
            grid = torch.as_tensor(e["image_grid_thw"])
            pos, _ = rope_model.get_rope_index(ids, mm_token_type_ids=tt, image_grid_thw=grid, attention_mask=None)
            mrope.append(pos)  # (3, 1, L)
            text_pos.append(torch.arange(ids.shape[1])[None, None])
        position_ids = torch.cat([torch.cat(text_pos, dim=2), torch.cat(mrope, dim=2)], dim=0)  # (4, 1, T)

        def cat(k: str) -> torch.Tensor:
            return torch.as_tensor(np.concatenate([np.asarray(e[k]) for e in encoded], axis=0))

        return {
            "input_ids": cat("input_ids")[None],
            "labels": cat("labels")[None],
            "mm_token_type_ids": cat("mm_token_type_ids")[None],
            "position_ids": position_ids,
            "pixel_values": cat("pixel_values"),
            "image_grid_thw": cat("image_grid_thw"),
            "use_cache": False,
        }

    def to_device(self, batch: dict) -> dict:
        """Move a padded batch to the model's device (pixel values in the model's dtype)."""
        dtype = next(self.model.parameters()).dtype
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, dtype=dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = v
        return out

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean token cross-entropy over the supervised (label != -100) tokens of a padded batch."""
        return self.model(**self.to_device(batch)).loss

    # ---- generation ------------------------------------------------------------------------------------------
    def eos_token_ids(self) -> list[int]:
        """The ids that end a reply (the encoder's end tokens and the generation config's)."""
        ids = list(self.encoder.end_token_ids)
        gc_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for t in [gc_eos] if isinstance(gc_eos, int) else (gc_eos or []):
            if t not in ids:
                ids.append(int(t))
        return ids

    def generate(
        self, samples: Sequence[Sample], images: Sequence[Any], params: Optional[GenerationParams] = None
    ) -> list[str]:
        """Reply text for each sample (prompt = system + image + user text), decoded in one left-padded batch.

        Raises :class:`SampleTooLong` (naming the sample) when a prompt plus ``max_new_tokens`` does not fit in
        ``max_length`` even without history; encode first and call :meth:`generate_encoded` to skip such rows."""
        params = params or GenerationParams()
        encoded = self.encode_prompts(samples, images, params)
        for e in encoded:
            if isinstance(e, ValueError):
                raise e
        return self.generate_encoded(encoded, params)

    def encode_prompts(
        self, samples: Sequence[Sample], images: Sequence[Any], params: Optional[GenerationParams] = None
    ) -> list:
        """Generation prompts (``encode(..., with_target=False)``), one per sample; a sample that cannot be encoded
        (:class:`SampleTooLong`, an unusable image) gets its ``ValueError`` in its place, so it fails alone."""
        params = params or GenerationParams()
        if len(samples) != len(images):
            raise ValueError(f"generate: {len(samples)} samples but {len(images)} images")
        # Reserve room for the reply only up to what the model can hold: a long max_new_tokens must not force
        # history drops for prompts that would fit.
        reserve = min(params.max_new_tokens, self.cfg.max_length // 4)
        out: list = []
        for s, im in zip(samples, images):
            try:
                out.append(self.encode(s, im, with_target=False, reserve=reserve))
            except ValueError as e:
                out.append(e)
        return out

    @torch.inference_mode()
    def generate_encoded(
        self,
        encoded: list[dict],
        params: Optional[GenerationParams] = None,
        streamer: Any = None,
        stopping_criteria: Any = None,
        logits_processor: Optional[Callable[[], list]] = None,
    ) -> list[str]:
        """Generate from already-encoded prompts (``encode(..., with_target=False)``).

        Rows that share an image and a long token prefix (``cfg.share_prefix``, native Qwen families) are decoded
        from one prefill of that prefix: a judge's 8 metric prompts for one answer differ only in their last
        lines, so the thousands of profile/history tokens are processed once instead of 8 times, and decoding
        attends to each prefix once per step for all its rows (:mod:`.shared_prefix`). All such groups of a
        batch decode in one ``generate`` call; the other rows go through one left-padded batch. Greedy replies
        are the same either way.

        ``streamer`` (a transformers ``BaseStreamer``) gets the prompt ids, then each step's new token of every row,
        rows in input order; ``stopping_criteria`` may end rows early (e.g. a client gone). With either, all rows
        decode as one padded batch (no shared-prefix groups), so the streamer's row order is the input order.
        ``logits_processor``: makes a fresh list of transformers logits processors for each ``generate`` call (they
        may keep per-row state, e.g. the judge's constrained score line)."""
        params = params or GenerationParams()
        if not encoded:
            return []
        texts: list[Optional[str]] = [None] * len(encoded)
        if streamer is not None or stopping_criteria is not None:
            batch = self.to_device(self.pad_batch(encoded, padding_side="left"))
            batch.pop("labels", None)
            extra = {"streamer": streamer, "stopping_criteria": stopping_criteria}
            return self._run_generate(
                lambda kw: self._new_tokens(self.model.generate(**batch, **kw, **extra), batch),
                params,
                logits_processor,
            )
        groups, plain = self.shared_prefix_groups(encoded)
        if groups:  # every group in one generate call: the per-step cost is shared by all their rows
            group_rows = [([encoded[i] for i in rows], prefix_len) for rows, prefix_len in groups]
            outs = self._run_generate(lambda kw: self._generate_from_prefixes(group_rows, kw), params, logits_processor)
            for i, t in zip([i for rows, _ in groups for i in rows], outs):
                texts[i] = t
        if plain:
            batch = self.to_device(self.pad_batch([encoded[i] for i in plain], padding_side="left"))
            batch.pop("labels", None)
            outs = self._run_generate(
                lambda kw: self._new_tokens(self.model.generate(**batch, **kw), batch), params, logits_processor
            )
            for i, t in zip(plain, outs):
                texts[i] = t
        return texts  # type: ignore[return-value]

    def shared_prefix_groups(self, encoded: Sequence[dict]) -> tuple[list[tuple[list[int], int]], list[int]]:
        """Split rows into ``([(row indices, shared prefix length), ...], other row indices)`` by
        :func:`.prefix_groups.plan_prefix_groups`. Only native Qwen families with ``cfg.share_prefix`` are
        grouped, and not models with sliding-window attention layers (their caches are not shared)."""
        n = len(encoded)
        text_cfg = getattr(self.model.config, "text_config", self.model.config)
        full_attention = not getattr(text_cfg, "use_sliding_window", False) and all(
            t == "full_attention" for t in (getattr(text_cfg, "layer_types", None) or [])
        )
        if not (self.cfg.share_prefix and self.family in NATIVE_FAMILIES and full_attention and n > 1):
            return [], list(range(n))
        return plan_prefix_groups(encoded, getattr(text_cfg, "hidden_size", 1024), self.cfg.min_shared_prefix)

    def _generate_from_prefixes(self, groups: list[tuple[list[dict], int]], kw: dict) -> list[list[int]]:
        """New tokens of every row of ``groups`` (``(rows, shared prefix length)``), rows in group order.

        Each group's prefix (with its image) is prefilled once at batch 1; the prefixes' caches become one
        shared-prefix cache (:mod:`.shared_prefix`: no per-row copy of a prefix while decoding), and ``generate``
        processes each row's own tokens, left-padded after its left-padded prefix (the attention mask hides the
        pads and the positions skip them, so each row sees exactly its unpadded prompt; Qwen's M-RoPE offsets
        from each prefix call are reused per row)."""
        core = self.model.get_base_model() if self.is_peft else self.model
        caches, deltas = [], []
        for rows, prefix_len in groups:
            first = rows[0]
            n = len(first["input_ids"])
            prefix = {
                k: (v[:prefix_len] if isinstance(v, np.ndarray) and v.ndim == 1 and len(v) == n else v)
                for k, v in first.items()
            }
            prefix_batch = self.to_device(self.pad_batch([prefix]))
            prefix_batch.pop("labels", None)
            out = self.model(**prefix_batch, use_cache=True, logits_to_keep=1)
            caches.append(out.cache if getattr(out, "cache", None) is not None else out.past_key_values)
            delta = getattr(core.model, "rope_deltas", None)
            deltas.append(None if delta is None else delta.expand(len(rows), -1))
        sizes = [len(rows) for rows, _ in groups]
        cache = shared_prefix_cache(caches, sizes)
        if all(d is not None for d in deltas):
            core.model.rope_deltas = torch.cat(deltas)  # one M-RoPE offset per row, from its group's prefix
        longest_prefix = max(p for _, p in groups)
        width = max(len(r["input_ids"]) - p for rows, p in groups for r in rows)
        total = longest_prefix + width
        ids = np.full((sum(sizes), total), self.encoder.pad_token_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids) if "mm_token_type_ids" in groups[0][0][0] else None
        row = 0
        for rows, p in groups:
            block = slice(row, row + len(rows))  # the group's rows share its prefix, right-aligned at longest_prefix
            ids[block, longest_prefix - p : longest_prefix] = np.asarray(rows[0]["input_ids"])[:p]
            mask[block, longest_prefix - p : longest_prefix] = 1
            if types is not None:
                types[block, longest_prefix - p : longest_prefix] = np.asarray(rows[0]["mm_token_type_ids"])[:p]
            for r in rows:
                own = np.asarray(r["input_ids"])[p:]
                ids[row, total - len(own) :] = own
                mask[row, total - len(own) :] = 1
                row += 1
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            batch["mm_token_type_ids"] = torch.from_numpy(types)
        batch = self.to_device(batch)
        with shared_prefix_decoding(self.model, cache):
            return self._new_tokens(self.model.generate(**batch, cache=cache, **kw), batch)

    @staticmethod
    def _new_tokens(out: torch.Tensor, batch: dict) -> list[list[int]]:
        return out[:, batch["input_ids"].shape[1] :].tolist()

    def _run_generate(self, call, params: GenerationParams, logits_processor=None) -> list[str]:
        """Run ``call(generate kwargs) -> new token ids`` in eval mode (seeded when asked) and decode the
        replies: cut at the first end token and at any stop string."""
        eos = self.eos_token_ids()
        kw: dict[str, Any] = {}
        if logits_processor is not None:
            from transformers import LogitsProcessorList

            kw["logits_processor"] = LogitsProcessorList(logits_processor())
        kw.update(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,
            do_sample=params.do_sample,
            eos_token_id=eos,
            pad_token_id=self.encoder.pad_token_id,
        )
        if params.do_sample:
            kw.update(temperature=params.temperature, top_p=params.top_p)
        else:  # unset sampling knobs so generation_config defaults (e.g. a checkpoint's top_k) do not warn
            kw.update(temperature=None, top_p=None, top_k=None)
        was_training = self.model.training
        self.model.eval()
        try:
            if params.seed is not None:
                devices = [self.device] if self.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(params.seed)
                    new = call(kw)
            else:
                new = call(kw)
        finally:
            if was_training:
                self.model.train()
        eos_set = set(eos)
        texts = []
        for row in new:
            cut = next((i for i, t in enumerate(row) if t in eos_set), len(row))
            text = self.tokenizer.decode(row[:cut], skip_special_tokens=True)
            for s in params.stop or []:
                j = text.find(s)
                if j >= 0:
                    text = text[:j]
            texts.append(text.strip())
        return texts

    # ---- saving ----------------------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Save in HF format (safetensors): the adapter only when LoRA is on, else the full model; plus the
        processor parts (tokenizer, image processor with the configured pixel budget, chat template)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        save_processor(self.processor, out)
        return out

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad or not trainable_only)


def build_vlm(cfg: VLMConfig) -> VLM:
    """Load model + processor per ``cfg`` (safetensors only; remote code only if opted in), apply freezing,
    gradient checkpointing and LoRA. The model is returned in eval mode; call ``vlm.model.train()`` to train."""
    from transformers import AutoModelForImageTextToText

    cfg = copy.deepcopy(cfg)
    proc_path, base_path = resolve_model_paths(cfg.model_path)
    if base_path != cfg.model_path:  # model_path is an adapter dir: load its base and the adapter on top
        if cfg.lora is None:
            cfg.lora = LoRASettings(adapter_path=cfg.model_path)
        elif cfg.lora.adapter_path is None:
            cfg.lora.adapter_path = cfg.model_path
    family = resolve_family(base_path, cfg.family, cfg.trust_remote_code)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cpu" and not torch.cuda.is_available():
        # Grouped-query attention inside torch's CPU sdpa kernels, also with a padding mask, instead of copying
        # the KV heads per query head every step: 1.5x faster CPU decoding measured. transformers does it only
        # without a mask by default, for CUDA's sake; the variable is process-wide, hence only on CUDA-less hosts.
        os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")
    kw: dict[str, Any] = dict(dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kw["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization:
        if device.type != "cuda":
            raise ValueError("VLMConfig.quantization (bitsandbytes) needs a CUDA device")
        kw["quantization_config"] = quantization_config(cfg.quantization, dtype)
        kw["device_map"] = {"": device.index or 0}
    model = AutoModelForImageTextToText.from_pretrained(base_path, **kw)
    if not cfg.quantization:
        model.to(device)
    model.eval()
    freeze_parts(model, cfg.freeze_vision, cfg.freeze_projector)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, family)
    processor = build_processor(proc_path, family, cfg.min_pixels, cfg.max_pixels, cfg.trust_remote_code)
    return VLM(model, processor, family, cfg, device)


def merge_lora(base_cfg: VLMConfig, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a LoRA adapter into its base model and save a full HF model (safetensors) + processor parts."""
    from peft import PeftModel

    cfg = copy.deepcopy(base_cfg)
    cfg.lora = None
    cfg.quantization = None  # merging into quantized weights would lose the adapter's precision
    cfg.gradient_checkpointing = False
    vlm = build_vlm(cfg)
    peft_model = PeftModel.from_pretrained(vlm.model, str(adapter_dir))
    merged = peft_model.merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    proc_src = str(adapter_dir) if (Path(adapter_dir) / "tokenizer_config.json").is_file() else cfg.model_path
    save_processor(build_processor(proc_src, vlm.family, cfg.min_pixels, cfg.max_pixels, cfg.trust_remote_code), out)
    return out
