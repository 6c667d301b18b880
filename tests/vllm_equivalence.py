"""engine: vllm against engine: hf, run in .venv-vllm (tests/test_vllm_engine.py launches it; also by hand):

    .venv-vllm/bin/python tests/vllm_equivalence.py OUT_DIR [--samples N] [--skip-score]

Builds the demo dataset and two tiny models (hidden 128: vLLM's CPU attention needs head_dim >= 32), then runs the
real jobs through Ray twice, once per engine: answering the demo test split (jobs' run_generate) and scoring the
agent's answers with the tiny judge (run_score). Compares greedy replies and parsed scores; writes
OUT_DIR/equivalence.json and exits 1 when the replies differ and fewer than 95% of the scores agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _answers(out: Path, model: str) -> dict[str, str]:
    recs = [json.loads(x) for x in (out / "answer_store" / f"{model}.jsonl").read_text().splitlines() if x.strip()]
    return {r["id"]: r["answer"] for r in recs}


def _scores(out: Path, model: str) -> dict[str, object]:
    recs = [json.loads(x) for x in (out / "judge_results" / f"{model}.jsonl").read_text().splitlines() if x.strip()]
    return {
        f"{r['sample_id']}|{r['metric']}": [r.get("score_a"), r.get("score_b"), r.get("review"), r.get("ok")]
        for r in recs
    }


def _make_adapter(base: Path, out: Path) -> None:
    """A LoRA adapter with non-zero B (peft starts B at zero, which would change nothing)."""
    import torch

    from mmrole.models import LoRASettings, VLMConfig, build_vlm

    vlm = build_vlm(VLMConfig(model_path=str(base), device="cpu", lora=LoRASettings(r=8, alpha=64)))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in vlm.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    vlm.save(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=None, help="answer only the first N test samples")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--skip-score", action="store_true")
    args = ap.parse_args(argv)

    from mmrole.data.demo import build_demo
    from mmrole.data.prepare import prepare
    from mmrole.eval.job_config import GenerateJobConfig, ScoreJobConfig, load_job_config
    from mmrole.models import make_tiny_vlm
    from mmrole.ray_env import init_ray
    from mmrole.ray_eval import run_generate, run_score

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = out / "MMRole_dataset"
    if not (root / "profiles").exists():
        build_demo(root, seed=0)
    prepared = out / "prepared"
    if not (prepared / "manifest.json").exists():
        prepare(root, prepared)
    agent = out / "tiny-agent"
    judge = out / "tiny-judge"
    if not (agent / "config.json").exists():
        make_tiny_vlm(agent, family="qwen2_5_vl", seed=0, hidden=128)
    if not (judge / "config.json").exists():
        make_tiny_vlm(judge, family="qwen2_vl", seed=1, hidden=128)
    init_ray(num_cpus=4, log_to_driver=False)
    report: dict = {"python": sys.executable}
    # share_prefix off: the HF shared-prefix decoding passes `cache=` to generate, which transformers 5.19 (vLLM's
    # pin, <5.20) rejects (`model_kwargs are not used by the model: ['cache']`)
    common = dict(device="cpu", dtype="float32", max_length=2048, share_prefix="false")
    vllm_settings = ["vllm.max_num_seqs=16", "vllm.kv_cache_space_gb=1"]
    for engine in ("hf", "vllm"):
        ov = [
            f"model_name=agent-{engine}",
            f"agent.model_path={agent}",
            f"agent.engine={engine}",
            f"data={prepared}",
            f"out={out / 'eval'}",
            f"generation.max_new_tokens={args.max_new_tokens}",
            "pool.concurrency=[1]",
            "pool.batch_size=64",
            "pool.num_cpus=1",
            "progress=false",
            *[f"agent.{k}={v}" for k, v in common.items()],
        ] + ([f"agent.{x}" for x in vllm_settings] if engine == "vllm" else [])
        if args.samples:
            ov.append(f"max_samples={args.samples}")
        t0 = time.perf_counter()
        s = run_generate(load_job_config(GenerateJobConfig, None, ov), log=lambda m: print(m, flush=True))
        report[f"generate_{engine}"] = {
            "seconds": round(time.perf_counter() - t0, 1),
            **{k: s[k] for k in ("samples", "answered", "failed", "failure_reasons")},
        }
    # LoRA: the agent as an adapter dir (vLLM LoRA request vs peft), a few samples
    adapter = out / "tiny-agent-lora"
    if not (adapter / "adapter_config.json").exists():
        _make_adapter(agent, adapter)
    for engine in ("hf", "vllm"):
        ov = [
            f"model_name=lora-{engine}",
            f"agent.model_path={adapter}",
            f"agent.engine={engine}",
            f"data={prepared}",
            f"out={out / 'eval'}",
            f"generation.max_new_tokens={args.max_new_tokens}",
            "max_samples=6",
            "pool.concurrency=[1]",
            "pool.batch_size=64",
            "pool.num_cpus=1",
            "progress=false",
            *[f"agent.{k}={v}" for k, v in common.items()],
        ] + ([f"agent.{x}" for x in vllm_settings + ["vllm.max_lora_rank=8"]] if engine == "vllm" else [])
        run_generate(load_job_config(GenerateJobConfig, None, ov), log=lambda m: print(m, flush=True))
    l_hf, l_vl = _answers(out / "eval", "lora-hf"), _answers(out / "eval", "lora-vllm")
    base = _answers(out / "eval", "agent-hf")
    report["lora"] = {
        "n": len(l_hf),
        "identical": sum(l_hf[k] == l_vl.get(k) for k in l_hf),
        "differs_from_base": sum(l_hf[k] != base.get(k) for k in l_hf),
        "differences": [{"id": k, "hf": l_hf[k], "vllm": l_vl.get(k)} for k in l_hf if l_hf[k] != l_vl.get(k)],
    }
    a_hf, a_vl = _answers(out / "eval", "agent-hf"), _answers(out / "eval", "agent-vllm")
    diff = sorted(k for k in a_hf if a_hf[k] != a_vl.get(k))
    report["answers"] = {
        "n": len(a_hf),
        "identical": len(a_hf) - len(diff),
        "differences": [{"id": k, "hf": a_hf[k], "vllm": a_vl.get(k)} for k in diff[:20]],
    }
    ok = not diff
    if not args.skip_score:
        for engine in ("hf", "vllm"):
            # both engines judge the hf agent's answers: the same requests
            ov = [
                f"eval_dir={out / 'eval'}",
                f"out={out / ('score-' + engine)}",
                "model_name=agent-hf",
                f"images_root={root / 'images'}",
                "judge.kind=local",
                f"judge.model.model_path={judge}",
                f"judge.engine={engine}",
                "judge.generation.max_new_tokens=24",
                "judge.max_retries=0",
                "pool.concurrency=[1]",
                "pool.batch_size=64",
                "pool.num_cpus=1",
                "progress=false",
                *[f"judge.model.{k}={v}" for k, v in common.items()],
            ] + ([f"judge.{x}" for x in vllm_settings] if engine == "vllm" else [])
            t0 = time.perf_counter()
            s = run_score(load_job_config(ScoreJobConfig, None, ov), log=lambda m: print(m, flush=True))
            report[f"score_{engine}"] = {
                "seconds": round(time.perf_counter() - t0, 1),
                **{k: s[k] for k in ("requests", "parsed", "failed")},
            }
        s_hf, s_vl = _scores(out / "score-hf", "agent-hf"), _scores(out / "score-vllm", "agent-hf")
        same_raw = [k for k in s_hf if s_hf[k][2] == s_vl.get(k, [None] * 4)[2]]
        same_score = [k for k in s_hf if s_hf[k][:2] == s_vl.get(k, [None] * 4)[:2]]
        report["scores"] = {
            "n": len(s_hf),
            "identical_replies": len(same_raw),
            "same_parsed_scores": len(same_score),
            "differences": [{"key": k, "hf": s_hf[k], "vllm": s_vl.get(k)} for k in s_hf if k not in same_raw][:20],
        }
        ok = (not diff or len(a_hf) - len(diff) >= 0.95 * len(a_hf)) and len(same_score) >= 0.95 * max(1, len(s_hf))
    else:
        ok = not diff or len(a_hf) - len(diff) >= 0.95 * len(a_hf)
    lo = report["lora"]
    ok = ok and lo["identical"] >= 0.95 * lo["n"] and lo["differs_from_base"] > 0
    report["ok"] = ok
    (out / "equivalence.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(json.dumps(report, indent=2, ensure_ascii=False)[:6000])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
