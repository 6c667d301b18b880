"""Serve benchmark: throughput and latency of the agent app with and without batching, Serve's overhead over the
same batched model called in-process, streaming time to first token, and replica memory across repeated runs.
Prints tables.

    .venv/bin/python bench/bench_serve.py                      # tiny model, concurrency 1, 8, 32
    .venv/bin/python bench/bench_serve.py --quick              # fewer requests
    .venv/bin/python bench/bench_serve.py --model-path DIR     # a real checkpoint (GPU: --device cuda)
    .venv/bin/python bench/bench_serve.py --adapters-only      # adapter memory on a 300M-parameter base (CPU)

Load is bounded (a fixed number of requests per level, at most --concurrency in flight) and goes to
127.0.0.1 only. Every reply has the same length (min_new_tokens = max_new_tokens), so configurations compare
fairly even with a random model that would otherwise stop at random.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_url(seed: int) -> str:
    from mmrole.models import tiny_image

    buf = io.BytesIO()
    tiny_image(seed, (96, 96)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(i: int, image: str, max_tokens: int) -> dict:
    return {
        "model": "mmrole-agent",
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are Captain Nova of the starship Lumen."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": f"Tell me about picture {i}."},
                ],
            },
        ],
    }


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def _load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send ``bodies`` with at most ``concurrency`` in flight; latency per request and overall throughput."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    sizes: list[int] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:

        async def one(b):
            nonlocal errors
            async with sem:
                t0 = time.perf_counter()
                r = await c.post(url, json=b)
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1
                else:
                    sizes.append(int(r.headers.get("x-mmrole-batch-size", 1)))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    return {
        "n": len(bodies),
        "rps": len(bodies) / wall,
        "p50": _pct(lat, 0.5) * 1e3,
        "p99": _pct(lat, 0.99) * 1e3,
        "batch": statistics.mean(sizes) if sizes else 0.0,
        "errors": errors,
    }


async def _stream_load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Streamed requests (``stream: true``), at most ``concurrency`` in flight: time to the first content chunk
    and to ``[DONE]``."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    total: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:

        async def one(b):
            nonlocal errors
            async with sem:
                t0 = time.perf_counter()
                first = None
                async with c.stream("POST", url, json=dict(b, stream=True)) as r:
                    if r.status_code != 200:
                        errors += 1
                        return
                    async for line in r.aiter_lines():
                        if first is None and line.startswith("data: ") and '"content": "' in line:
                            if '"content": ""' not in line:
                                first = time.perf_counter() - t0
                        if line == "data: [DONE]":
                            break
                total.append(time.perf_counter() - t0)
                ttft.append(first if first is not None else total[-1])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    return {
        "n": len(bodies),
        "rps": len(bodies) / wall,
        "ttft50": _pct(ttft, 0.5) * 1e3 if ttft else float("nan"),
        "ttft99": _pct(ttft, 0.99) * 1e3 if ttft else float("nan"),
        "total50": _pct(total, 0.5) * 1e3 if total else float("nan"),
        "errors": errors,
    }


def _stats(client, base: str) -> dict:
    return client.get(base + "/v1/stats").json()


def _app_args(model: dict, batch: int, max_tokens: int, conc: int, wait: float) -> dict:
    return {
        "model": model,
        "torch_threads": 1,
        "generation": {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens},
        "batching": {"max_batch_size": batch, "batch_wait_timeout_s": wait},
        "deployment": {
            "num_replicas": 1,
            "max_ongoing_requests": max(conc, batch),
            "max_queued_requests": 4 * conc,
            "num_cpus": 1,
        },
    }


class InProcess:
    """The same engine without Ray or HTTP: requests decoded in batches of ``batch`` (what Serve forms at full
    load), image decoding and tokenisation included, in this process."""

    def __init__(self, model: dict, images: list[str], batch: int, max_tokens: int):
        from mmrole.models.config import GenerationParams
        from mmrole.serving import RequestLimits
        from serve.engine import Engine

        self.eng = Engine.load(model, "inproc", torch_threads=1)
        self.images, self.batch, self.max_tokens = images, batch, max_tokens
        self.limits = RequestLimits()
        self.defaults = GenerationParams(max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        self.run(batch)  # warm-up

    def run(self, n: int, batch: int = 0) -> float:
        from mmrole.serving import decode_image, decode_image_url, parse_chat

        batch = batch or self.batch
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            enc, ps = [], []
            for i in range(s, min(n, s + batch)):
                url = self.images[i % len(self.images)]
                inp = parse_chat(_body(i, url, self.max_tokens), self.limits, self.defaults)
                img = decode_image(decode_image_url(url, self.limits, "image"), self.limits, "image")
                enc.append(self.eng.encode(inp.sample(str(i), ""), img, inp.params, "messages"))
                ps.append(inp.params)
            self.eng.generate(enc, ps)
        return time.perf_counter() - t0


def adapter_memory(model_path: str, device: str, tmp: str, n: int = 4, rank: int = 64) -> dict:
    """Replica memory (the serving engine, in this process) with 1 vs ``n`` LoRA adapters on one base, against
    the old way (one more engine, i.e. a base copy, per adapter)."""
    import gc

    import torch

    from mmrole.models import LoRASettings, VLMConfig, build_vlm
    from serve.common import rss_bytes
    from serve.engine import AdapterPool, Engine

    dirs = {}
    for i in range(n):
        vlm = build_vlm(VLMConfig(model_path=model_path, device=device, lora=LoRASettings(r=rank)))
        with torch.no_grad():
            for name, p in vlm.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        dirs[f"lora{i}"] = str(vlm.save(Path(tmp) / f"lora{i}"))
        del vlm
    gc.collect()
    eng = Engine.load({"model_path": model_path, "device": device}, "base", torch_threads=1)
    pool = AdapterPool(eng, dirs, max_count=n)
    eng.pool = pool
    gc.collect()
    rss = [rss_bytes()]
    for name in dirs:
        pool.activate(name)
        gc.collect()
        rss.append(rss_bytes())
    adapter_bytes = pool.bytes / n
    file_bytes = statistics.mean((Path(d) / "adapter_model.safetensors").stat().st_size for d in dirs.values())
    before_copy = rss_bytes()
    copy = Engine.load({"model_path": model_path, "device": device}, "copy", torch_threads=1)
    gc.collect()
    copy_cost = rss_bytes() - before_copy
    base_params = sum(p.numel() * p.element_size() for p in copy.vlm.model.parameters())
    copy.close()
    eng.close()
    return {
        "rss": rss,
        "adapter_bytes": adapter_bytes,
        "file_bytes": file_bytes,
        "copy_cost": copy_cost,
        "base_bytes": base_params,
        "n": n,
        "rank": rank,
    }


def _parse_count(text: str) -> int:
    """``300M``, ``1.5G``, ``250000000`` -> a number of parameters."""
    t = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(t[-1:], 1)
    return int(float(t[:-1] if scale > 1 else t) * scale)


def make_sized_base(out: Path, params: int, hidden: int) -> Path:
    """A random-weight Qwen2.5-VL-shaped model of about ``params`` parameters (decoder width ``hidden``, as many
    layers as fit; the tiny model's tokenizer and vision tower), saved once as safetensors. No download."""
    from mmrole.models import make_tiny_vlm

    per_layer = 9 * hidden * hidden  # q, o: h*h; k, v: h*h/2 (2 of 4 heads); MLP: 3 * h * 2h
    return make_tiny_vlm(out, family="qwen2_5_vl", seed=0, hidden=hidden, layers=max(1, round(params / per_layer)))


def make_adapters(base: str, tmp: Path, n: int, rank: int) -> dict[str, str]:
    """``n`` LoRA adapters (rank ``rank`` on every linear layer of the decoder, random non-zero weights) saved as
    peft dirs, made on one load of the base."""
    import gc

    import torch

    from mmrole.models import LoRASettings, VLMConfig, build_vlm

    vlm = build_vlm(VLMConfig(model_path=base, device="cpu", lora=LoRASettings(r=rank, alpha=rank)))
    dirs = {}
    for i in range(n):
        with torch.no_grad():
            gen = torch.Generator().manual_seed(i)
            for name, p in vlm.model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        out = tmp / f"lora{i}"
        vlm.model.save_pretrained(out, safe_serialization=True)
        dirs[f"lora{i}"] = str(out)
    del vlm
    gc.collect()
    return dirs


def measure_adapters(base: str, dirs: dict[str, str], with_copy: bool) -> dict:
    """In a fresh process: the agent replica's engine on ``base`` (RSS and parameter bytes), then each adapter
    loaded the way the replica loads it (``AdapterPool``: peft ``load_adapter`` / ``set_adapter``) and used for
    one reply, so lazy allocations count; then (``with_copy``) one more engine, the old way of serving an adapter."""
    import gc

    import peft  # noqa: F401  (imported before the first reading: the table shows model memory, not imports)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import mmrole.models.vlm  # noqa: F401
    from mmrole.data.records import Sample
    from mmrole.models import tiny_image
    from mmrole.models.config import GenerationParams
    from serve.common import rss_bytes
    from serve.engine import AdapterPool, Engine

    def param_bytes(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.parameters())

    sample = Sample(
        id="m",
        system="You are Captain Nova.",
        user_text="What is in the picture?",
        image="",
        target="",
        role="r",
        other_role="o",
        script="",
        dialogue_type="chat",
        k=0,
    )
    params = GenerationParams(max_new_tokens=4, min_new_tokens=4)
    gc.collect()
    rss = [rss_bytes()]  # interpreter, torch, transformers, peft
    eng = Engine.load({"model_path": base, "device": "cpu"}, "base", torch_threads=2)
    enc = eng.encode(sample, tiny_image(0), params, "messages")
    eng.generate([enc], [params])
    gc.collect()
    rss.append(rss_bytes())
    pbytes = [param_bytes(eng.vlm.model)]
    pool = AdapterPool(eng, dirs, max_count=len(dirs))
    eng.pool = pool
    replies = []
    for name in dirs:
        pool.activate(name)
        replies.append(eng.generate([enc], [params])[0])
        gc.collect()
        rss.append(rss_bytes())
        pbytes.append(param_bytes(eng.vlm.model))
    out = {"rss": rss, "param_bytes": pbytes, "pool_bytes": pool.bytes, "replies": replies, "copy_rss": None}
    if with_copy:
        before = rss_bytes()
        copy = Engine.load({"model_path": base, "device": "cpu"}, "copy", torch_threads=2)
        copy.generate([copy.encode(sample, tiny_image(0), params, "messages")], [params])
        gc.collect()
        out["copy_rss"] = rss_bytes() - before
        copy.close()
    eng.close()
    return out


def adapters_at_size(params: int, hidden: int, n: int, rank: int, with_copy: bool) -> int:
    """Build a base of ``params`` parameters and ``n`` adapters, measure them in a fresh process, print a table."""
    import shutil
    import subprocess

    tmp = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    t0 = time.perf_counter()
    base = str(make_sized_base(tmp / "base", params, hidden))
    dirs = make_adapters(base, tmp, n, rank)
    built = time.perf_counter() - t0
    job = json.dumps({"base": base, "dirs": dirs, "with_copy": with_copy})
    proc = subprocess.run(
        [sys.executable, __file__, "--measure-adapters", job], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    base_file = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    files = [(Path(d) / "adapter_model.safetensors").stat().st_size for d in dirs.values()]
    cfg = json.loads((Path(base) / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    mib = 2**20
    rss, pb = m["rss"], m["param_bytes"]
    load = os.getloadavg()
    print(
        f"\nAdapters on one base: random Qwen2.5-VL-shaped model (decoder {text_cfg['num_hidden_layers']} layers x "
        f"{text_cfg['hidden_size']} wide), fp32 on CPU; LoRA r={rank} on every linear layer of the decoder; "
        f"replica engine + AdapterPool in a fresh process, one 4-token reply per adapter; {os.cpu_count()} cores, "
        f"load average {load[0]:.1f}; built in {built:.0f}s\n"
    )
    print("| state | RSS MiB | parameter MiB | RSS added MiB | added / adapter size |")
    print("|---|---|---|---|---|")
    print(f"| process (imports) | {rss[0] / mib:.0f} | - | - | - |")
    print(f"| base only | {rss[1] / mib:.0f} | {pb[0] / mib:.0f} | {(rss[1] - rss[0]) / mib:+.0f} | - |")
    for k in range(1, n + 1):
        added = rss[k + 1] - rss[k]
        print(
            f"| {k} adapter(s) | {rss[k + 1] / mib:.0f} | {pb[k] / mib:.0f} | {added / mib:+.1f} | "
            f"{added / files[k - 1]:.2f} |"
        )
    if m["copy_rss"] is not None:
        print(f"| old way: +1 engine | - | - | {m['copy_rss'] / mib:+.0f} | {m['copy_rss'] / files[0]:.1f} |")
    extra = (rss[n + 1] - rss[2]) / (n - 1) if n > 1 else rss[2] - rss[1]
    print(
        f"\nbase model: {pb[0] / mib:.0f} MiB of parameters ({pb[0] // 4 / 1e6:.0f}M fp32), file {base_file / mib:.0f} "
        f"MiB; each adapter: file {statistics.mean(files) / mib:.1f} MiB, {m['pool_bytes'] / n / mib:.1f} MiB of "
        f"weights in the pool; 1 -> {n} adapters: {(rss[n + 1] - rss[2]) / mib:+.0f} MiB RSS, "
        f"{extra / mib:+.1f} MiB per extra adapter = {extra / statistics.mean(files):.2f}x its size "
        f"(parameter bytes: {(pb[n] - pb[1]) / (n - 1) / statistics.mean(files):.2f}x)"
        if n > 1
        else ""
    )
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _median_row(rounds: list[dict]) -> dict:
    """The round with the median throughput (load on a shared box drifts; rounds alternate configurations)."""
    return sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="model dir (default: a tiny random model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size of the batched configuration")
    ap.add_argument("--batch-wait", type=float, default=0.02, help="batch_wait_timeout_s (both configurations)")
    ap.add_argument("--requests", type=int, default=0, help="requests per round (default: 4 x concurrency, >= 16)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per level (median reported)")
    ap.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    ap.add_argument("--adapters-only", action="store_true", help="only the adapter memory table, at a real size")
    ap.add_argument("--adapter-base-size", default="300M", help="parameters of the --adapters-only base model")
    ap.add_argument("--adapter-base-hidden", type=int, default=2048, help="its decoder width (Qwen2.5-VL-3B: 2048)")
    ap.add_argument("--adapters", type=int, default=4, help="adapters loaded on the base")
    ap.add_argument("--adapter-rank", type=int, default=64)
    ap.add_argument("--no-copy", action="store_true", help="skip the old way (a second engine) in --adapters-only")
    ap.add_argument("--measure-adapters", default=None, help=argparse.SUPPRESS)  # the fresh measuring process
    a = ap.parse_args(argv)
    if a.measure_adapters:
        job = json.loads(a.measure_adapters)
        print(json.dumps(measure_adapters(job["base"], job["dirs"], job["with_copy"])))
        return 0
    if a.adapters_only:
        return adapters_at_size(
            _parse_count(a.adapter_base_size), a.adapter_base_hidden, a.adapters, a.adapter_rank, not a.no_copy
        )
    levels = [int(x) for x in a.concurrency.split(",")]
    top = max(levels)
    rounds = 1 if a.quick else a.rounds

    def per_level(c: int) -> int:
        return a.requests or max(8 if a.quick else 16, (2 if a.quick else 4) * c)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import httpx
    import ray
    from ray import serve

    from mmrole.models import make_tiny_vlm
    from serve.agent_app import build_app

    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    model_path = a.model_path or str(make_tiny_vlm(Path(tmp) / "tiny", family="qwen2_5_vl", seed=0))
    model = {"model_path": model_path, "device": a.device}
    images = [_image_url(i) for i in range(8)]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    configs = {"batched": a.batch, "max_batch_size=1": 1}
    results: dict = {(k, c): [] for k in configs for c in levels}
    inproc_rps: list[float] = []
    streams: dict = {}
    rss: dict = {k: [] for k in configs}
    t_start = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Both configurations stay deployed (one replica each, idle when not measured) so rounds can alternate.
        for label, batch in configs.items():
            prefix = "/" + ("b" if batch > 1 else "u")
            t0 = time.perf_counter()
            serve.run(
                build_app(_app_args(model, batch, a.max_tokens, top, a.batch_wait)),
                name=prefix[1:],
                route_prefix=prefix,
            )
            print(f"[{label}] deployed in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        url = {k: f"{base}/{'b' if b > 1 else 'u'}" for k, b in configs.items()}
        client = httpx.Client(timeout=120)
        for k in configs:  # warm-up, then memory before load
            asyncio.run(
                _load(url[k] + "/v1/chat/completions", [_body(i, images[i % 8], a.max_tokens) for i in range(8)], 8)
            )
            rss[k].append(_stats(client, url[k])["rss_bytes"])
        inproc = InProcess(model, images, a.batch, a.max_tokens)
        inproc_single = statistics.median(inproc.run(1, 1) for _ in range(7)) * 1e3
        for c in levels:
            n = per_level(c)
            for r in range(rounds):
                for k in configs:
                    res = asyncio.run(
                        _load(
                            url[k] + "/v1/chat/completions",
                            [_body(i, images[i % 8], a.max_tokens) for i in range(n)],
                            c,
                        )
                    )
                    results[(k, c)].append(res)
                    if c == top:
                        rss[k].append(_stats(client, url[k])["rss_bytes"])
                if c == top:
                    inproc_rps.append(n / inproc.run(n))
                print(
                    f"c={c} round {r + 1}: "
                    + ", ".join(f"{k} {results[(k, c)][-1]['rps']:.1f} req/s" for k in configs),
                    file=sys.stderr,
                )
        for c in levels:  # streaming on the batched configuration: time to first token
            n = per_level(c)
            bodies = [_body(i, images[i % 8], a.max_tokens) for i in range(n)]
            streams[c] = asyncio.run(_stream_load(url["batched"] + "/v1/chat/completions", bodies, c))
            print(f"c={c} streaming: ttft p50 {streams[c]['ttft50']:.0f} ms", file=sys.stderr)
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
    mem = adapter_memory(model_path, a.device, tmp)
    rows = [{"config": k, "conc": c, **_median_row(results[(k, c)])} for k in configs for c in levels]
    load = os.getloadavg()
    print(
        f"\nServe agent app; model: {'tiny random qwen2_5_vl' if a.model_path is None else a.model_path} "
        f"({a.device}), {a.max_tokens} new tokens/request, 1 replica per config (1 CPU, 1 torch thread), "
        f"batched: max_batch_size={a.batch}, batch_wait_timeout_s={a.batch_wait}; {os.cpu_count()} cores, "
        f"load average {load[0]:.1f}; median of {rounds} alternating round(s); {time.perf_counter() - t_start:.0f}s\n"
    )
    print(
        f"| {'config':<17} | {'conc':>4} | {'reqs':>4} | {'req/s':>7} | {'p50 ms':>8} | {'p99 ms':>8} | "
        f"{'mean batch':>10} | {'errors':>6} |"
    )
    print(f"|{'-' * 19}|{'-' * 6}|{'-' * 6}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 12}|{'-' * 8}|")
    for r in rows:
        print(
            f"| {r['config']:<17} | {r['conc']:>4} | {r['n']:>4} | {r['rps']:>7.1f} | {r['p50']:>8.0f} | "
            f"{r['p99']:>8.0f} | {r['batch']:>10.1f} | {r['errors']:>6} |"
        )
    print()
    by = {(r["config"], r["conc"]): r for r in rows}
    for c in levels:
        b, u = by[("batched", c)], by[("max_batch_size=1", c)]
        per_round = [x["rps"] / y["rps"] for x, y in zip(results[("batched", c)], results[("max_batch_size=1", c)])]
        print(
            f"batching speed-up at concurrency {c:>2}: {b['rps'] / u['rps']:.2f}x throughput "
            f"(per round: {', '.join(f'{x:.2f}x' for x in per_round)})"
        )
    b1, bt = by[("batched", min(levels))], by[("batched", top)]
    ip = statistics.median(inproc_rps)
    print(
        f"in-process batched model (batches of {a.batch}): {ip:.1f} req/s; via Serve at concurrency {top}: "
        f"{bt['rps']:.1f} req/s (Serve delivers {bt['rps'] / ip:.0%} of it)"
    )
    print(
        f"single request in-process: {inproc_single:.0f} ms; via Serve (p50, concurrency {min(levels)}): "
        f"{b1['p50']:.0f} ms (Serve + HTTP + batch wait: {b1['p50'] - inproc_single:+.0f} ms)"
    )
    print(
        f"\nStreaming (stream: true, batched config): time to first token vs whole reply\n\n"
        f"| {'conc':>4} | {'reqs':>4} | {'req/s':>7} | {'TTFT p50 ms':>11} | {'TTFT p99 ms':>11} | "
        f"{'reply p50 ms':>12} | {'errors':>6} |"
    )
    print(f"|{'-' * 6}|{'-' * 6}|{'-' * 9}|{'-' * 13}|{'-' * 13}|{'-' * 14}|{'-' * 8}|")
    for c, st in streams.items():
        print(
            f"| {c:>4} | {st['n']:>4} | {st['rps']:>7.1f} | {st['ttft50']:>11.0f} | {st['ttft99']:>11.0f} | "
            f"{st['total50']:>12.0f} | {st['errors']:>6} |"
        )
    print()
    mib = 2**20
    r = mem["rss"]
    extra = (r[-1] - r[1]) / (mem["n"] - 1)
    print(
        f"Adapters on one base (LoRA r={mem['rank']}, in-process engine): replica RSS with 1 adapter "
        f"{r[1] / mib:.1f} MiB, with {mem['n']}: {r[-1] / mib:.1f} MiB; each extra adapter {extra / mib:+.2f} MiB "
        f"RSS vs its weights {mem['adapter_bytes'] / mib:.2f} MiB (file {mem['file_bytes'] / mib:.2f} MiB); "
        f"the old way (one engine per adapter) costs {mem['copy_cost'] / mib:+.1f} MiB RSS per adapter "
        f"(base weights {mem['base_bytes'] / mib:.1f} MiB)"
    )
    for k, xs in rss.items():
        mib = [x / 2**20 for x in xs]
        print(
            f"replica RSS [{k}]: before load {mib[0]:.0f} MiB; after each round at concurrency {top}: "
            + ", ".join(f"{x:.0f}" for x in mib[1:])
            + f" MiB (first to last round: {mib[-1] - mib[1]:+.0f} MiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
