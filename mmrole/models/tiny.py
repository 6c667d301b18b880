"""Tiny random-weight VLMs for tests, the demo and CPU CI (no downloads).

``make_tiny_vlm(out, family)`` trains a byte-level BPE tokenizer on a small synthetic corpus (with the family's
special tokens), builds a model of a few hundred thousand parameters from a config, and saves everything in the
layout of a real checkpoint (config.json, model.safetensors, generation_config.json, tokenizer files,
preprocessor_config.json, chat_template.jinja), so ``from_pretrained(out)`` works with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

from .config import NATIVE_FAMILIES
from .encoding import CONTROL_TOKENS

# Qwen chat markers and vision placeholders; the order fixes their ids (0..N-1) in the tiny vocabulary.
QWEN_SPECIALS = [
    *CONTROL_TOKENS,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
]
FAMILY_EXTRA_SPECIALS = {"qwen3_vl": ["<think>", "</think>"]}

# The Qwen2-VL / Qwen2.5-VL instruct chat template (as shipped with the checkpoints).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a an of to and in is was he she it they we you I my your his her their our this that with for on at by "
    "from as be have has had not but or so what who where when why how which there here now then very more most "
    "image picture photo scene look see seen looks like character role story world light dark sky sea city castle "
    "sword magic king queen prince friend enemy battle journey dream heart love fear hope time day night old young "
    "great little good bad red blue green white black gold silver stone tree river mountain road house door window "
    "said says ask asked answer think thought know feel felt speak spoke tell told say would could should must "
    "Harry Potter Hermione Sherlock Holmes Watson Elizabeth Darcy Sun Wukong Li Bai Hamlet Juliet Romeo "
    "comment dialogue question reply turn human curious"
).split()


def _corpus(seed: int, n: int = 2000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        s = " ".join(words)
        out.append(s[0].upper() + s[1:] + rng.choice([".", "?", "!", ",", ":"]))
    out += ["0 1 2 3 4 5 6 7 8 9 10 100 2024", "\n\n", "- [", "]: ", "**Name**"]
    return out


def train_tiny_tokenizer(family: str = "qwen2_5_vl", vocab_size: int = 512, seed: int = 0):
    """A byte-level BPE tokenizer (Qwen-style specials) trained on a synthetic corpus; returns a
    ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = QWEN_SPECIALS + FAMILY_EXTRA_SPECIALS.get(family, [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(seed), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=specials[1:]
    )
    hf.padding_side = "left"  # Qwen checkpoints ship left padding for generation; we pad ourselves anyway
    hf.chat_template = QWEN_CHAT_TEMPLATE
    return hf


def _image_processor(family: str):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if family == "qwen3_vl":  # Qwen3-VL: 16-px patches, mean/std 0.5
        return Qwen2VLImageProcessorPil(
            min_pixels=64 * 64,
            max_pixels=128 * 128,
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
    return Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )


def tiny_config(family: str, tok, hidden: int = 64, layers: int = 2):
    """A transformers config of the family with tiny sizes (head_dim 16, so mrope_section sums to 8)."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    heads, kv = 4, 2
    head_dim = hidden // heads
    common_text = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    mm = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    # M-RoPE splits the rotary half-dim into (temporal, height, width) sections that must sum to head_dim / 2.
    half = head_dim // 2
    t_sec = half // 4
    h_sec = (half - t_sec) // 2
    mrope = [t_sec, h_sec, half - t_sec - h_sec]
    # Qwen2-VL and Qwen2.5-VL: the same text decoder with sectioned M-RoPE
    text = dict(common_text, rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0})
    common_vision = dict(depth=2, num_heads=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    # Qwen2.5-VL and Qwen3-VL: a vision tower of its own width, projected to the decoder's by the merger
    merger_vision = dict(common_vision, hidden_size=32, intermediate_size=64, out_hidden_size=hidden)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(common_vision, embed_dim=32, hidden_size=hidden, mlp_ratio=2, patch_size=14)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **mm)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(merger_vision, patch_size=14, window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **mm)
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        # Qwen3-VL: explicit head_dim, interleaved M-RoPE, learned vision position grid (a square number of
        # positions, interpolated to the image grid) and DeepStack features taken from vision layer 0.
        text = dict(
            common_text,
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": mrope,
                "mrope_interleaved": True,
                "rope_theta": 10000.0,
            },
        )
        vision = dict(merger_vision, patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **mm)
    raise ValueError(f"make_tiny_vlm: unknown family {family!r}; choose one of {NATIVE_FAMILIES}")


def make_tiny_vlm(
    out_dir: str | Path,
    family: str = "qwen2_5_vl",
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    vocab_size: int = 512,
    overwrite: bool = True,
) -> Path:
    """Write a random-weight ``family`` model (~200-300k parameters) with a locally trained tokenizer to
    ``out_dir``; returns the directory. Deterministic for a given seed."""
    import torch
    from transformers import AutoModelForImageTextToText

    from .processor import no_video_processor_class, save_processor

    if family not in NATIVE_FAMILIES:
        raise ValueError(f"make_tiny_vlm: unknown family {family!r}; choose one of {NATIVE_FAMILIES}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer(family, vocab_size=vocab_size, seed=seed)
    cfg = tiny_config(family, tok, hidden=hidden, layers=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg)
    model.eval()
    gc = model.generation_config
    gc.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    gc.pad_token_id = tok.pad_token_id
    gc.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    gc.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    proc = no_video_processor_class(family)(
        image_processor=_image_processor(family), tokenizer=tok, video_processor=None, chat_template=QWEN_CHAT_TEMPLATE
    )
    save_processor(proc, out)
    return out


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_image(seed: int = 0, size: Optional[tuple[int, int]] = None):
    """A deterministic random RGB test image (PIL)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size or (int(rng.integers(64, 140)), int(rng.integers(64, 140)))
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
