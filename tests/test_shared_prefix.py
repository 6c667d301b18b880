"""Shared-prefix (cascade) attention against plain attention over the same keys: several groups with prefixes of
different lengths (left-padded), unequal group sizes, rows with left-padded own tokens; the prefill of the rows'
own tokens (q > 1) and a decoding step (q = 1); torch's fused CPU kernel and the eager path used elsewhere."""

from __future__ import annotations

import pytest
import torch

from mmrole.models import shared_prefix as sp


class Attn(torch.nn.Module):
    """The attributes of a transformers attention module that the attention functions read."""

    def __init__(self, groups: int):
        super().__init__()
        self.layer_idx, self.num_key_value_groups, self.is_causal = 0, groups, True


class Holder:
    def __init__(self, layer):
        self.layers = [layer]


def reference(query, keys, values, mask, scale):
    """Plain softmax attention in float64; ``keys``/``values`` ``[B, kv, L, D]``, ``mask`` ``[B, 1, q, L]``."""
    groups = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(groups, dim=1)
    v = values.double().repeat_interleave(groups, dim=1)
    scores = (query.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)  # [B, q, H, D]


def build_case(group_sizes, prefix_lengths, own_lengths, q_len, kv_heads=2, groups=2, dim=8, seed=0):
    """Random prefixes/own keys, the layer, the transformers-style 4-D mask and the plain-attention inputs."""
    g = torch.Generator().manual_seed(seed)
    rows, longest = sum(group_sizes), max(prefix_lengths)
    width = max(own_lengths)
    pk = torch.randn(len(group_sizes), kv_heads, longest, dim, generator=g)
    pv = torch.randn(len(group_sizes), kv_heads, longest, dim, generator=g)
    pmask = torch.zeros(len(group_sizes), longest, dtype=torch.bool)
    for i, n in enumerate(prefix_lengths):
        pmask[i, longest - n :] = True
    layer = sp.SharedPrefixLayer(pk, pv, group_sizes, pmask)
    own_k = torch.randn(rows, kv_heads, width, dim, generator=g)
    own_v = torch.randn(rows, kv_heads, width, dim, generator=g)
    own_mask = torch.zeros(rows, width, dtype=torch.bool)
    for r, n in enumerate(own_lengths):
        own_mask[r, width - n :] = True
    group_of = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    mask2d = torch.cat([pmask[group_of], own_mask], dim=1)  # what generate's attention mask holds
    total = longest + width
    q_pos = torch.arange(total - q_len, total)
    mask4d = (torch.arange(total)[None, :] <= q_pos[:, None])[None, None] & mask2d[:, None, None, :]
    full_k = torch.cat([pk[group_of], own_k], dim=2)
    full_v = torch.cat([pv[group_of], own_v], dim=2)
    query = torch.randn(rows, kv_heads * groups, q_len, dim, generator=g)
    # Feed the own keys the way the cache does: all but the last q_len first, then the call's own.
    if width > q_len:
        layer.update(own_k[:, :, : width - q_len], own_v[:, :, : width - q_len])
    return layer, query, own_k[:, :, width - q_len :], own_v[:, :, width - q_len :], mask4d, full_k, full_v


CASES = [  # group sizes, prefix lengths, own lengths (per row)
    ([3, 3], [11, 7], [4, 2, 5, 5, 1, 3]),  # equal groups: one batched call
    ([2, 4, 1], [6, 13, 9], [3, 5, 5, 2, 4, 1, 5]),  # unequal groups: one call per group
    ([4], [10], [2, 6, 6, 3]),  # one group, no prefix padding
]


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-fused", "eager"])
@pytest.mark.parametrize("sizes,prefixes,owns", CASES)
def test_shared_prefix_attention_equals_plain_attention(monkeypatch, fused, sizes, prefixes, owns):
    if not fused:
        monkeypatch.setattr(sp, "_CPU_FLASH", None)
    elif sp._CPU_FLASH is None:
        pytest.fail("torch has no _scaled_dot_product_flash_attention_for_cpu: the CPU fast path is gone")
    for q_len in (max(owns), 1):  # the rows' own prompt tokens, then one decoding step
        layer, query, key, value, mask4d, full_k, full_v = build_case(sizes, prefixes, owns, q_len, seed=q_len)
        own_k, own_v = layer.update(key, value)
        assert layer.get_seq_length() == max(prefixes) + max(owns)
        module = Attn(groups=query.shape[1] // key.shape[1])
        token = sp._ACTIVE.set(Holder(layer))
        try:
            out, _ = sp.shared_prefix_attention(module, query, own_k, own_v, mask4d, scaling=0.3)
        finally:
            sp._ACTIVE.reset(token)
        want = reference(query, full_k, full_v, mask4d, 0.3)
        assert out.shape == want.shape and torch.isfinite(out).all()  # padding queries: finite, not NaN
        width = max(owns)
        for r, n in enumerate(owns):  # the real (non-padding) query positions of each row
            real = [i for i in range(q_len) if width - q_len + i >= width - n]
            torch.testing.assert_close(out[r, real].double(), want[r, real], atol=2e-5, rtol=1e-4)


def test_layer_rejects_what_it_cannot_do():
    pk = torch.zeros(2, 1, 4, 8)
    with pytest.raises(ValueError, match="2 prefixes for group sizes"):
        sp.SharedPrefixLayer(pk, pk, [3])
    layer = sp.SharedPrefixLayer(pk, pk, [1, 2])
    for call in (
        lambda: layer.crop(-1),
        lambda: layer.batch_repeat_interleave(2),
        lambda: layer.reorder_cache(torch.tensor([0, 1, 2])),
    ):
        with pytest.raises(NotImplementedError):
            call()
