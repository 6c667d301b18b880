"""Encoded samples -> model batches: dynamic padding with vision inputs concatenated in batch order, and the
packing plan (which samples share one packed row)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

IGNORE_INDEX = -100  # label value that carries no loss (transformers' default ignore_index)

# Keys of an encoded sample that are per-sample metadata, not model inputs.
META_KEYS = ("id", "num_text_tokens", "num_image_tokens", "history_kept", "history_dropped", "num_target_tokens")
# Per-token keys and their padding values; any other 1-D per-token array from a generic processor pads with 0.
TOKEN_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}


def pad_encoded(
    encoded: Sequence[dict], pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: Optional[int] = None
) -> dict:
    """Pad per-token arrays to the longest sample in the batch (dynamic padding, ``input_ids`` with
    ``pad_token_id``) and concatenate the vision inputs; returns torch tensors ready for ``model(**batch)``."""
    import torch

    if not encoded:
        raise ValueError("pad_batch: empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = [len(e["input_ids"]) for e in encoded]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    first = encoded[0]
    seq_keys = [
        k
        for k, v in first.items()
        if k not in META_KEYS
        and k != "pixel_values"
        and isinstance(v, np.ndarray)
        and v.ndim == 1
        and len(v) == lengths[0]
    ]
    if "labels" in seq_keys and not all("labels" in e for e in encoded):
        raise ValueError("pad_batch: some samples have labels and some do not")
    batch: dict[str, Any] = {}
    for k in seq_keys:
        pad = pad_token_id if k == "input_ids" else TOKEN_PAD_VALUES.get(k, 0)
        out = np.full((len(encoded), width), pad, dtype=np.int64)
        for i, e in enumerate(encoded):
            v = np.asarray(e[k])
            if padding_side == "right":
                out[i, : len(v)] = v
            else:
                out[i, width - len(v) :] = v
        batch[k] = torch.from_numpy(out)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for i, n in enumerate(lengths):
        if padding_side == "right":
            mask[i, :n] = 1
        else:
            mask[i, width - n :] = 1
    batch["attention_mask"] = torch.from_numpy(mask)
    # Vision inputs are concatenated in batch order (text-only samples contribute none); the model consumes
    # them in the order of the image placeholders, which is the same order.
    img_keys = list(dict.fromkeys(k for e in encoded for k in e if k not in META_KEYS and k not in seq_keys))
    for k in img_keys:
        arrs = [np.asarray(e[k]) for e in encoded if k in e]
        cat = np.concatenate(arrs, axis=0)
        batch[k] = torch.from_numpy(np.ascontiguousarray(cat))
    return batch


def plan_packs(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices into packs of total length <= ``max_length`` (first-fit decreasing).

    A sample longer than ``max_length`` gets a pack of its own (the encoder already refused anything longer than
    its own ``max_length``)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for j, r in enumerate(room):
            if n <= r:
                packs[j].append(i)
                room[j] -= n
                break
        else:
            packs.append([i])
            room.append(max_length - n)
    return [sorted(p) for p in packs]
