"""One test per private API the project relies on (docs/internals.md): each fails when the internal changes in a
way our code would notice, naming what changed. Models area; training and serving entries live with their code."""

from __future__ import annotations

import inspect

import torch

from mmrole.models import shared_prefix as sp


def test_cpu_flash_attention_op_returns_lse():
    """``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (shared-prefix attention on CPU): called by
    keyword, returns (output [B, H, q, D], log-sum-exp [B, H, q]) and takes an additive float mask."""
    op = sp._CPU_FLASH
    assert op is not None, "torch no longer has aten._scaled_dot_product_flash_attention_for_cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (4, 6, 6))
    mask = torch.zeros(2, 1, 4, 6)
    mask[0, ..., :2] = float("-inf")  # left padding of the first row
    scale = 8**-0.5
    out, lse = op(q, k, v, dropout_p=0.0, is_causal=False, attn_mask=mask, scale=scale)
    scores = (q @ k.transpose(-1, -2)) * scale + mask
    ref_lse = torch.logsumexp(scores, dim=-1)
    ref_out = torch.softmax(scores, dim=-1) @ v
    assert out.shape == (2, 3, 4, 8) and lse.shape == (2, 3, 4)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-4)


# What transformers' Cache calls on a layer (transformers 5.x), each reviewed for SharedPrefixLayer: a new method
# on DynamicLayer may need an override there (e.g. one that reads keys/values and would miss the prefix).
DYNAMIC_LAYER_METHODS = {
    "lazy_initialization",
    "update",
    "get_mask_sizes",
    "get_seq_length",
    "get_max_length",
    "reset",
    "crop",
    "batch_repeat_interleave",
    "batch_select_indices",
    "reorder_cache",
    "offload",
    "prefetch",
}


def test_dynamic_layer_subclass_contract():
    """``transformers.cache_utils.DynamicLayer`` subclassed by SharedPrefixLayer: the reviewed method set, and
    the mask size transformers derives from our ``get_seq_length`` spans prefix + own tokens."""
    from transformers.cache_utils import DynamicLayer

    methods = {n for n, f in inspect.getmembers(DynamicLayer, inspect.isfunction) if not n.startswith("_")}
    assert methods <= DYNAMIC_LAYER_METHODS, (
        f"DynamicLayer has new methods to review: {methods - DYNAMIC_LAYER_METHODS}"
    )
    pk, pv = torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)
    layer = sp.SharedPrefixLayer(pk, pv, [3])
    own_k = torch.ones(3, 2, 2, 4)
    keys, values = layer.update(own_k, own_k.clone())
    assert keys.shape == (3, 2, 2, 4), "update must return only the rows' own keys"
    assert layer.get_seq_length() == 7
    assert layer.get_mask_sizes(1) == (8, 0)


def test_attn_implementation_switch(tiny_models):
    """``config._attn_implementation`` (read: no public getter) and the public ``set_attn_implementation`` with
    a per-sub-config dict: only the decoder switches to our registered function, and it switches back."""
    from mmrole.models import VLMConfig, build_vlm

    vlm = build_vlm(VLMConfig(model_path=tiny_models["agent"], device="cpu"))
    model = vlm.model
    text, vision = model.config.text_config, model.config.vision_config
    before_text, before_vision = sp.attn_implementation(text), sp.attn_implementation(vision)
    sp._register()
    with sp.shared_prefix_decoding(model, cache=None):
        assert sp.attn_implementation(text) == sp.ATTN_NAME
        assert sp.attn_implementation(vision) == before_vision
        decoder_attn = next(m for n, m in model.named_modules() if n.endswith("language_model.layers.0.self_attn"))
        assert decoder_attn.config._attn_implementation == sp.ATTN_NAME
    assert sp.attn_implementation(text) == before_text


def test_qwen_rope_deltas_attribute(tiny_models):
    """Qwen's ``model.model.rope_deltas`` (M-RoPE offsets cached by a prefill with an image): the shared-prefix
    path reads it after each group's prefix call and sets one offset per row before decoding."""
    from PIL import Image

    from mmrole.data.records import Sample
    from mmrole.models import GenerationParams, VLMConfig, build_vlm

    vlm = build_vlm(VLMConfig(model_path=tiny_models["agent"], device="cpu"))
    assert hasattr(vlm.model.model, "rope_deltas"), "Qwen models no longer keep rope_deltas"
    sample = Sample(
        id="s-0",
        system="You are a wizard.",
        user_text="What do you see?",
        image="x.png",
        target="",
        role="Harry Potter",
        other_role="human",
        script="Harry Potter",
        dialogue_type="human-role",
        k=1,
    )
    vlm.generate([sample], [Image.new("RGB", (56, 56), "red")], GenerationParams(max_new_tokens=2))
    delta = vlm.model.model.rope_deltas
    assert isinstance(delta, torch.Tensor) and delta.shape == (1, 1), delta


def test_processor_check_argument_hook():
    """``ProcessorMixin.check_argument_for_proper_class(argument_name, argument)`` is overridden so the Qwen
    processors accept ``video_processor=None`` (the video processor needs torchvision)."""
    from transformers.processing_utils import ProcessorMixin

    from mmrole.models.processor import no_video_processor_class

    params = list(inspect.signature(ProcessorMixin.check_argument_for_proper_class).parameters)
    assert params == ["self", "argument_name", "argument"], params
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        cls = no_video_processor_class(family)
        assert cls.check_argument_for_proper_class(None, "video_processor", None) is None


def test_backend_tokenizer_is_the_rust_tokenizer(tiny_models):
    """``tokenizer.backend_tokenizer`` (public; replaced ``tokenizer._tokenizer``): the Rust tokenizer our fast
    path encodes with gives the same ids as the wrapper."""
    from tokenizers import Tokenizer

    from mmrole.models.processor import build_processor

    tok = build_processor(tiny_models["agent"]).tokenizer
    raw = tok.backend_tokenizer
    assert isinstance(raw, Tokenizer)
    text = "Hello, Hermione! Ça va?"
    assert raw.encode(text, add_special_tokens=False).ids == tok(text, add_special_tokens=False)["input_ids"]


def test_internals_doc_names_each_test():
    """docs/internals.md names this file's test for each models-area entry."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "internals.md").read_text()
    for test in (
        "test_cpu_flash_attention_op_returns_lse",
        "test_dynamic_layer_subclass_contract",
        "test_attn_implementation_switch",
        "test_qwen_rope_deltas_attribute",
        "test_processor_check_argument_hook",
        "test_backend_tokenizer_is_the_rust_tokenizer",
    ):
        assert test in doc and test in globals(), test
