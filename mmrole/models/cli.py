"""``mmrole model tiny|merge|info``."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("model", help="model utilities: tiny offline models, LoRA merge, info")
    sub = p.add_subparsers(dest="model_command", required=True)

    t = sub.add_parser("tiny", help="write a tiny random-weight VLM with a locally trained tokenizer (no downloads)")
    t.add_argument("out", help="output directory (Hugging Face format)")
    t.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--hidden", type=int, default=64, help="text hidden size (multiple of 64)")
    t.add_argument("--layers", type=int, default=2)
    t.set_defaults(func=_tiny)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model and save a full model")
    m.add_argument("--base", required=True, help="base model dir or hub id")
    m.add_argument("--adapter", required=True, help="adapter dir (adapter_config.json + adapter_model.safetensors)")
    m.add_argument("--out", required=True)
    m.add_argument("--family", default="auto")
    m.add_argument("--dtype", default="auto")
    m.add_argument("--device", default="auto")
    m.add_argument("--trust-remote-code", action="store_true")
    m.set_defaults(func=_merge)

    i = sub.add_parser("info", help="load a model and print its family, sizes and processor settings as JSON")
    i.add_argument("path")
    i.add_argument("--family", default="auto")
    i.add_argument("--trust-remote-code", action="store_true")
    i.set_defaults(func=_info)


def _tiny(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_vlm

    out = make_tiny_vlm(args.out, family=args.family, seed=args.seed, hidden=args.hidden, layers=args.layers)
    print(out)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .config import VLMConfig
    from .vlm import merge_lora

    cfg = VLMConfig(
        model_path=args.base,
        family=args.family,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    print(merge_lora(cfg, args.adapter, args.out))
    return 0


def _info(args: argparse.Namespace) -> int:
    from .config import VLMConfig
    from .vlm import build_vlm

    vlm = build_vlm(
        VLMConfig(model_path=args.path, family=args.family, device="cpu", trust_remote_code=args.trust_remote_code)
    )
    ip = getattr(vlm.processor, "image_processor", None)
    size = getattr(ip, "size", None)
    print(
        json.dumps(
            {
                "family": vlm.family,
                "class": type(vlm.model).__name__,
                "parameters": vlm.num_parameters(),
                "vocab": len(vlm.tokenizer),
                "processor": type(vlm.processor).__name__,
                "image_size": dict(size) if size is not None else None,
                "end_token_ids": vlm.encoder.end_token_ids,
            },
            indent=2,
            default=str,
        )
    )
    return 0
