"""Sample packing for training: a micro-batch's samples go into rows of at most ``max_length`` tokens (first-fit
decreasing by length, :func:`~mmrole.models.batching.plan_packs`), each row built by ``VLM.pack_batch`` (per-sample
position ids that restart at 0, so attention never crosses samples: a block-diagonal causal mask on CPU/sdpa,
varlen with flash-attention), labels per sample. Rows of one micro-batch are right-padded to the longest; the
padding is a segment of its own with no labels. The loss is the same token-weighted sum as unpacked."""

from __future__ import annotations

import torch

from mmrole.models.batching import IGNORE_INDEX, plan_packs


def pack_samples(cfg, family: str) -> bool:
    """Whether a run packs: ``data.packing`` null = where the family can; true for a family that cannot is refused
    (ConfigError naming the key)."""
    from mmrole.config import ConfigError
    from mmrole.models.config import NATIVE_FAMILIES

    able = family in NATIVE_FAMILIES
    if cfg.data.packing and not able:
        raise ConfigError(
            f"data.packing: the {family!r} model cannot pack samples (implemented for {', '.join(NATIVE_FAMILIES)}); "
            "set data.packing=false"
        )
    return able if cfg.data.packing is None else bool(cfg.data.packing)


def packed_batch(vlm, encoded: list[dict], max_length: int) -> dict:
    """One model batch of packed rows for ``encoded`` training samples."""
    packs = plan_packs([len(e["input_ids"]) for e in encoded], max_length)
    rows = [vlm.pack_batch([encoded[i] for i in p]) for p in packs]
    width = max(r["input_ids"].shape[1] for r in rows)
    pad_id = vlm.encoder.pad_token_id

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        extra = width - t.shape[-1]
        if extra == 0:
            return t
        if t.dim() == 3:  # position ids (4, 1, T): the padding restarts at 0 (a segment of its own)
            tail = torch.arange(extra, dtype=t.dtype).expand(t.shape[0], 1, extra)
            return torch.cat([t, tail], dim=-1)
        return torch.cat([t, torch.full((t.shape[0], extra), value, dtype=t.dtype)], dim=-1)

    return {
        "input_ids": torch.cat([pad(r["input_ids"], pad_id) for r in rows]),
        "labels": torch.cat([pad(r["labels"], IGNORE_INDEX) for r in rows]),
        "mm_token_type_ids": torch.cat([pad(r["mm_token_type_ids"], 0) for r in rows]),
        "position_ids": torch.cat([pad(r["position_ids"], 0) for r in rows], dim=1),
        "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
        "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows]),
        "use_cache": False,
    }


def padding_waste(lengths: list[int], micro_batch: int, max_length: int, packing: bool) -> float:
    """Tokens computed / real tokens for micro-batches of ``micro_batch`` consecutive samples."""
    real = computed = 0
    for lo in range(0, len(lengths), micro_batch):
        chunk = lengths[lo : lo + micro_batch]
        real += sum(chunk)
        if packing:
            packs = plan_packs(chunk, max_length)
            computed += len(packs) * max(sum(chunk[i] for i in p) for p in packs)
        else:
            computed += len(chunk) * max(chunk)
    return computed / max(real, 1)
