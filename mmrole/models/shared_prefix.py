"""Decoding many rows that share long prompt prefixes without a per-row copy of the prefix (cascade attention).

A judge's 8 metric prompts for one answer share thousands of tokens (profiles, history, both answers) and differ
in their last lines. :class:`SharedPrefixLayer` keeps each group's prefix keys/values once (groups' prefixes
left-padded to the longest) and each row's own tokens separately. :func:`shared_prefix_attention` attends the
rows' queries to their group's prefix with the group's rows folded into the query axis (each prefix is read once
per step, whatever the number of rows) and to each row's own keys, and merges the two softmaxes by their
log-sum-exps. Nothing per step grows with the prefix times the rows: no per-row prefix copy, no re-concatenation
of it as the cache grows.

It plugs into transformers' own ``generate``: the layers replace a ``DynamicCache``'s layers, and the attention
function is registered under :data:`ATTN_NAME` and switched on for the decoder's config only inside
:func:`shared_prefix_decoding`. On CPU both parts use torch's fused flash-attention kernel (it returns the
log-sum-exp); elsewhere (CUDA) decoding uses eager math and the prefill of the rows' own tokens uses sdpa over the
prefixes expanded once (the memory of an ordinary batched prefill). Pure torch + transformers.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer

ATTN_NAME = "mmrole_shared_prefix"

# The cache whose prefix the attention function reads. Set only while a shared-prefix generate call runs.
_ACTIVE: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar("mmrole_shared_prefix_cache", default=None)


class SharedPrefixLayer(DynamicLayer):
    """One layer's cache for groups of rows, each group sharing one prefix.

    The prefixes' keys/values are held once per group (``[groups, kv_heads, P, head_dim]``, left-padded to the
    longest prefix; ``prefix_mask`` marks the real positions) and each row's own keys/values separately
    (``[rows, kv_heads, S, head_dim]``); rows are ordered group by group (``group_sizes``). ``update`` appends to
    the rows' part and returns only that part; the attention function reads the prefixes from here. Lengths
    reported to transformers count both (P + S), so its 2-D attention mask spans prefix + own tokens."""

    is_croppable = False

    def __init__(
        self,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        group_sizes: Sequence[int],
        prefix_mask: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        if prefix_keys.shape[0] != len(group_sizes) or min(group_sizes, default=0) < 1:
            raise ValueError(f"SharedPrefixLayer: {prefix_keys.shape[0]} prefixes for group sizes {list(group_sizes)}")
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.prefix_mask = prefix_mask  # [groups, P] bool, None = no padding
        # The same mask as an additive bias [groups, 1, 1, P], made once: every layer's decoding step uses it.
        self.prefix_bias = (
            None
            if prefix_mask is None
            else torch.zeros(prefix_mask.shape, dtype=prefix_keys.dtype, device=prefix_keys.device).masked_fill_(
                ~prefix_mask, float("-inf")
            )[:, None, None, :]
        )
        self.prefix_length = prefix_keys.shape[-2]
        self.group_sizes = [int(n) for n in group_sizes]
        rows = sum(self.group_sizes)
        self.device = prefix_keys.device
        self.keys = prefix_keys.new_empty((rows, prefix_keys.shape[1], 0, prefix_keys.shape[-1]))
        self.values = prefix_values.new_empty((rows, prefix_values.shape[1], 0, prefix_values.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.prefix_length + self.keys.shape[-2]

    def expanded_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefixes repeated to one per row (``[rows, kv_heads, P, head_dim]``): a copy, made once per call."""
        if len(self.group_sizes) == 1:
            n = self.group_sizes[0]
            return self.prefix_keys.expand(n, -1, -1, -1), self.prefix_values.expand(n, -1, -1, -1)
        sizes = torch.tensor(self.group_sizes, device=self.device)
        return (
            self.prefix_keys.repeat_interleave(sizes, dim=0, output_size=int(sizes.sum())),
            self.prefix_values.repeat_interleave(sizes, dim=0, output_size=int(sizes.sum())),
        )

    def reset(self) -> None:
        raise NotImplementedError("SharedPrefixLayer: a shared-prefix cache is used for one generate call")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SharedPrefixLayer: cropping (assisted decoding) is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SharedPrefixLayer: beam search / several samples per row are not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("SharedPrefixLayer: beam search is not supported")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SharedPrefixLayer: beam search is not supported")


def shared_prefix_cache(prefix_caches: Sequence, group_sizes: Sequence[int]):
    """One cache for ``sum(group_sizes)`` rows from batch-1 ``DynamicCache`` prefills of each group's prefix
    (``prefix_caches[g]``); shorter prefixes are left-padded (masked). Reuses the first cache object (its layers
    are replaced). Raises ``ValueError`` for caches with sliding-window or non-attention layers."""
    if len(prefix_caches) != len(group_sizes) or not prefix_caches:
        raise ValueError(f"shared_prefix_cache: {len(prefix_caches)} caches for {len(group_sizes)} groups")
    lengths = [c.get_seq_length() for c in prefix_caches]
    longest = max(lengths)
    out = prefix_caches[0]
    for i in range(len(out.layers)):
        layers = [c.layers[i] for c in prefix_caches]
        for layer in layers:
            if type(layer) is not DynamicLayer or layer.keys.shape[0] != 1:
                raise ValueError(
                    f"shared_prefix_cache: layer {i} is a {type(layer).__name__} of batch "
                    f"{getattr(layer.keys, 'shape', ['?'])[0]}, not a batch-1 full-attention DynamicLayer"
                )
        if len(layers) == 1:
            keys, values, mask = layers[0].keys, layers[0].values, None
        else:
            k0 = layers[0].keys
            keys = k0.new_zeros((len(layers), k0.shape[1], longest, k0.shape[-1]))
            values = layers[0].values.new_zeros(
                (len(layers), layers[0].values.shape[1], longest, layers[0].values.shape[-1])
            )
            mask = torch.zeros((len(layers), longest), dtype=torch.bool, device=k0.device)
            for g, (layer, n) in enumerate(zip(layers, lengths)):
                keys[g, :, longest - n :] = layer.keys[0]
                values[g, :, longest - n :] = layer.values[0]
                mask[g, longest - n :] = True
        out.layers[i] = SharedPrefixLayer(keys, values, group_sizes, mask)
    return out


def _merge(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Combine two attention outputs over disjoint key sets from their log-sum-exps (fp32)."""
    lse = torch.logaddexp(lse1, lse2)
    return torch.exp(lse1 - lse)[..., None] * o1.float() + torch.exp(lse2 - lse)[..., None] * o2.float()


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning (output, log-sum-exp) for ``[batch, heads, q, D]`` inputs with as many key as
    query heads. ``mask``: a bool keep-mask or an additive float mask, broadcastable to the scores.

    On CPU, torch's fused flash-attention kernel (it returns the log-sum-exp too; ~5x faster than the eager
    version at decoding shapes, no score matrix in memory); elsewhere eager math with fp32 scores."""
    if _fused_lse(q):
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        out, lse = _CPU_FLASH(
            q, k, v, dropout_p=0.0, is_causal=False, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale
        )
        return out, lse
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).to(v.dtype)
    return torch.matmul(probs, v), lse


# torch's CPU flash-attention op, which returns (output, log-sum-exp); private, hence looked up defensively and
# called by keyword (docs/internals.md; tests/test_internals.py::test_cpu_flash_attention_op_returns_lse).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``[B, H, q, D]`` in, ``[B, q, H, D]`` out) for the decoder layers of a
    shared-prefix generate call; ``key``/``value`` are the rows' own keys/values from :class:`SharedPrefixLayer`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cache = _ACTIVE.get()
    layer_idx = getattr(module, "layer_idx", None)
    layer = cache.layers[layer_idx] if cache is not None and layer_idx is not None else None
    if not isinstance(layer, SharedPrefixLayer):  # e.g. a vision block: plain sdpa
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows, heads, q_len, dim = query.shape
    if q_len > 1 and not _fused_lse(query):
        # The rows' own prompt tokens (once per call) where no fused kernel returns the log-sum-exp (CUDA): sdpa
        # over the prefixes expanded to the rows, the memory of one ordinary batched prefill. Decoding below
        # never expands them.
        pk, pv = layer.expanded_prefix()
        return sdpa_attention_forward(
            module,
            query,
            torch.cat([pk, key], dim=-2),
            torch.cat([pv, value], dim=-2),
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            **kwargs,
        )
    kv_heads = layer.prefix_keys.shape[1]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    # The query heads of one KV head are adjacent: fold them with the query positions, [rows, kv, groups*q, D].
    q = query.reshape(rows, kv_heads, groups * q_len, dim)
    o1, lse1 = _attend_prefixes(q, layer, scale)
    # Own part: each row against its own keys, with the own columns of the causal + padding mask.
    own_len = key.shape[-2]
    if attention_mask is not None:
        own_mask = attention_mask[..., -own_len:]  # [rows, 1, q, S]
        if own_mask.shape[-2] > 1 and groups > 1:
            own_mask = (
                own_mask.unsqueeze(2)
                .expand(-1, -1, groups, -1, -1)
                .reshape(own_mask.shape[0], own_mask.shape[1], groups * q_len, own_len)
            )
    elif q_len > 1:  # no mask = plain causal: the last q_len of the S own positions
        causal = torch.ones(q_len, own_len, dtype=torch.bool, device=query.device).tril(own_len - q_len)
        own_mask = causal.repeat(groups, 1)[None, None]
    else:
        own_mask = None
    o2, lse2 = _attend(q, key, value, scale, own_mask)
    # A padding query sees no own key (empty softmax): it takes the prefix part alone, never a NaN.
    # (elementwise, no host sync: this runs per layer and decoding step)
    seen = torch.isfinite(lse2)
    o2 = torch.where(seen[..., None], o2, torch.zeros((), dtype=o2.dtype, device=o2.device))
    lse2 = torch.where(seen, lse2, torch.full((), float("-inf"), device=lse2.device))
    out = _merge(o1, lse1, o2, lse2).to(query.dtype)  # [rows, kv, groups*q, D]
    return out.reshape(rows, heads, q_len, dim).transpose(1, 2), None


def _fused_lse(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and _CPU_FLASH is not None


def _attend_prefixes(q: torch.Tensor, layer: SharedPrefixLayer, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's rows (``q`` = ``[rows, kv, m, D]``) against the group's prefix: ``[rows, kv, m, D]`` outputs and
    ``[rows, kv, m]`` log-sum-exps. A group's rows are folded into the query axis, so each prefix is read once
    per call whatever the number of rows."""
    rows, kv_heads, m, dim = q.shape
    sizes = layer.group_sizes
    pk, pv, pm = layer.prefix_keys, layer.prefix_values, layer.prefix_bias
    if len(set(sizes)) == 1:  # equal groups (a judge's 8 metrics per answer): one batched call
        n_groups, per = len(sizes), sizes[0]
        qf = q.reshape(n_groups, per, kv_heads, m, dim).transpose(1, 2).reshape(n_groups, kv_heads, per * m, dim)
        o, lse = _attend(qf, pk, pv, scale, pm)
        o = o.reshape(n_groups, kv_heads, per, m, dim).transpose(1, 2).reshape(rows, kv_heads, m, dim)
        lse = lse.reshape(n_groups, kv_heads, per, m).transpose(1, 2).reshape(rows, kv_heads, m)
        return o, lse
    outs, lses, start = [], [], 0
    for g, n in enumerate(sizes):
        qf = q[start : start + n].transpose(0, 1).reshape(1, kv_heads, n * m, dim)
        o, lse = _attend(qf, pk[g : g + 1], pv[g : g + 1], scale, None if pm is None else pm[g : g + 1])
        outs.append(o.reshape(kv_heads, n, m, dim).transpose(0, 1))
        lses.append(lse.reshape(kv_heads, n, m).transpose(0, 1))
        start += n
    return torch.cat(outs), torch.cat(lses)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_NAME, shared_prefix_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


def decoder_config(model):
    """The config the decoder's attention layers read (``text_config`` of a VLM)."""
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


# Decoder configs switched to ATTN_NAME: id -> (implementation before, number of calls inside). Shared by the
# threads of a process (a Serve replica may run batches concurrently): the first call in switches, the last out
# restores. Meanwhile plain calls of other threads are unaffected: without an active shared-prefix cache the
# function is plain sdpa, and the mask function registered with it is sdpa's.
_switched: dict[int, tuple[object, int]] = {}
_switch_lock = threading.Lock()


def attn_implementation(config) -> Optional[str]:
    """The attention implementation a config selects (transformers keeps it in ``_attn_implementation``; there is
    no public getter; docs/internals.md)."""
    return config._attn_implementation


def set_decoder_attn_implementation(model, name: Optional[str]) -> None:
    """Switch only the decoder's attention (not the vision tower's) with transformers' public
    ``set_attn_implementation`` (a dict keyed by sub-config for a VLM)."""
    if getattr(model.config, "text_config", None) is not None:
        model.set_attn_implementation({"text_config": name})
    else:
        model.set_attn_implementation(name)


@contextlib.contextmanager
def shared_prefix_decoding(model, cache) -> Iterator[None]:
    """Within the block, ``model``'s decoder attends through :func:`shared_prefix_attention` with ``cache``'s
    shared prefixes (this thread / context only)."""
    _register()
    cfg = decoder_config(model)
    with _switch_lock:
        before, users = _switched.get(id(cfg), (attn_implementation(cfg), 0))
        _switched[id(cfg)] = (before, users + 1)
        if users == 0:
            set_decoder_attn_implementation(model, ATTN_NAME)
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        with _switch_lock:
            before, users = _switched.pop(id(cfg))
            if users > 1:
                _switched[id(cfg)] = (before, users - 1)
            else:
                set_decoder_attn_implementation(model, before)
