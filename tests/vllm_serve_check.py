"""The Serve agent app with ``engine: vllm``, asked by the official ``openai`` client (plain, streamed, a LoRA
adapter), run in .venv-vllm (tests/test_vllm_engine.py launches it; also by hand):

    .venv-vllm/bin/python tests/vllm_serve_check.py OUT_DIR

Writes OUT_DIR/serve_check.json; exits 1 when a check fails.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    import openai
    from ray import serve

    from mmrole.models import LoRASettings, VLMConfig, build_vlm, make_tiny_vlm
    from mmrole.models.tiny import tiny_image
    from mmrole.ray_env import init_ray

    sys.path.insert(0, str(REPO))
    from serve import agent_app

    tiny = make_tiny_vlm(out / "agent", family="qwen2_5_vl", seed=0, hidden=128)
    # a LoRA adapter with non-zero B, so that it changes replies (peft initialises B to zero)
    vlm = build_vlm(VLMConfig(model_path=str(tiny), device="cpu", lora=LoRASettings(r=8, alpha=64)))
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in vlm.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lora = vlm.save(out / "nova-lora")
    init_ray(num_cpus=4, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = agent_app.build_app(
        {
            "model": {"model_path": str(tiny), "device": "cpu", "dtype": "float32", "max_length": 2048},
            "engine": "vllm",
            "vllm": {"max_num_seqs": 8, "max_lora_rank": 8},
            "adapters": {"nova-lora": str(lora)},
            "generation": {"max_new_tokens": 8},
            "deployment": {"num_replicas": 1, "num_cpus": 1, "max_ongoing_requests": 32},
        }
    )
    t0 = time.perf_counter()
    serve.run(app, name="agent", route_prefix="/agent")
    report: dict = {"deploy_s": round(time.perf_counter() - t0, 1)}
    buf = io.BytesIO()
    tiny_image(0).save(buf, format="PNG")
    img = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [
        {"role": "system", "content": "You are Captain Nova."},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "Hi?"}],
        },
    ]
    oc = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/agent/v1", api_key="unused", max_retries=0, timeout=300)
    checks = {}
    report["models"] = [m.id for m in oc.models.list().data]
    plain = oc.chat.completions.create(model="mmrole-agent", max_tokens=8, temperature=0, messages=msgs)
    report["plain"] = plain.choices[0].message.content
    checks["plain_nonempty"] = bool(report["plain"]) and plain.usage.prompt_tokens > 0
    chunks = list(
        oc.chat.completions.create(
            model="mmrole-agent",
            max_tokens=8,
            temperature=0,
            messages=msgs,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    report["streamed"] = streamed
    report["stream_chunks"] = len(chunks)
    checks["stream_equals_plain"] = streamed == report["plain"]
    checks["stream_has_several_chunks"] = len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    lora_reply = oc.chat.completions.create(model="nova-lora", max_tokens=8, temperature=0, messages=msgs)
    report["lora"] = lora_reply.choices[0].message.content
    checks["lora_answers_differently"] = report["lora"] != report["plain"]
    report["checks"] = checks
    report["ok"] = all(checks.values())
    (out / "serve_check.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(json.dumps(report, indent=2, ensure_ascii=False))
    serve.shutdown()
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
