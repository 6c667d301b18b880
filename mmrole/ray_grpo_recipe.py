"""Online GRPO on Ray Train + DeepSpeed: the GRPO step and its held-out reward measurement, on the shared recipe
life (:mod:`mmrole.ray_recipe`: resume, engine, data stream, checkpoints, logging).

One optimizer step on a worker:

1. **rollouts**: ``grpo.group_size`` replies per prompt of this rank's share of the step, sampled from the current
   policy in one batched ``generate`` (:func:`mmrole.rl.rollout.sample_rollouts`), each seeded from (seed, step,
   sample id, rollout index): a resumed run samples exactly what the uninterrupted one did;
2. **rewards** (:mod:`mmrole.rl.rewards`): the judge's MMRole-Eval ratio on the chosen metrics (a local reward
   model as a pool of Ray actors, or a Serve / OpenAI-compatible judge endpoint) and rule rewards;
3. **update**: group-normalised advantages, the clipped objective and the k3 KL to the frozen reference policy
   (:mod:`mmrole.rl.grpo`), token-weighted over the whole global batch as SFT is.

Failures are counted, never scored: a rollout that fails, an empty reply sent to no judge, a judge reply that does
not parse. A step whose every reward failed is skipped (no update; the LR schedule still moves, so a resume lines
up); once failures exceed ``grpo.max_failed_share`` of all rollouts so far the run stops and the driver reports
``"ok": false``. Prompts too long for ``model.max_length - grpo.max_new_tokens`` are rejected by the encoder and
recorded in the run's rejects like any rejected row.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from mmrole.ray_recipe import Recipe, StepOutcome, run_on_ray_worker, say
from mmrole.ray_recipe_engine import TrainEngine, build_frozen_vlm
from mmrole.rl.config import GRPOJobConfig
from mmrole.rl.grpo import group_advantages, grpo_token_loss
from mmrole.rl.logprobs import model_logits, token_logprobs
from mmrole.rl.rewards import RolloutReward, failure_reason_key, judge_requests, rollout_reward
from mmrole.rl.rollout import Rollout, model_inputs, rollout_seed, sample_rollouts, training_sample
from mmrole.train import checkpoint as ckpt
from mmrole.train.dist import allreduce_sum
from mmrole.train.row_encoder import META
from mmrole.train.step import StepTotals, backward_scale

COMPONENTS = ("judge", "language", "length", "generic", "style")


class JudgeActor:
    """A Ray actor holding one judge (the local reward model): serialized requests in, serialized results out."""

    def __init__(self, judge: dict, images_root: str):
        from mmrole.config import build_dataclass
        from mmrole.eval.job_config import JudgeSettings
        from mmrole.ray_eval import build_judge

        self.judge = build_judge(build_dataclass(JudgeSettings, judge), images_root)

    def score(self, requests: list[dict]) -> list[dict]:
        from mmrole.eval.contract import JudgeRequest

        return [r.to_dict() for r in self.judge.score_batch([JudgeRequest.from_dict(q) for q in requests])]


class RewardJudge:
    """The judge of a worker: a pool of :class:`JudgeActor` (kind local) or an in-process client (serve, openai);
    ``score(requests)`` returns one result per request, in order."""

    def __init__(self, cfg: GRPOJobConfig, images_root: str, rank: int):
        g = cfg.grpo
        self.batch_size = g.judge_batch_size
        self.actors: list = []
        self.client = None
        if g.judge.kind == "local":
            import ray

            cls = ray.remote(JudgeActor).options(num_cpus=g.judge_num_cpus, num_gpus=g.judge_num_gpus)
            settings = _judge_dict(g.judge)
            self.actors = [cls.remote(settings, images_root) for _ in range(g.judge_actors)]
        else:
            from mmrole.ray_eval import build_judge

            self.client = build_judge(g.judge, images_root)

    def score(self, requests: list) -> list:
        from mmrole.eval.contract import JudgeResult

        if not requests:
            return []
        chunks = [requests[i : i + self.batch_size] for i in range(0, len(requests), self.batch_size)]
        if self.client is not None:
            return [r for c in chunks for r in self.client.score_batch(c)]
        import ray

        refs = [self.actors[i % len(self.actors)].score.remote([q.to_dict() for q in c]) for i, c in enumerate(chunks)]
        return [JudgeResult.from_dict(d) for out in ray.get(refs) for d in out]

    def close(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                ray.kill(a)
            self.actors = []


def _judge_dict(judge) -> dict:
    import dataclasses

    return dataclasses.asdict(judge)


class GRPORecipe(Recipe):
    """Online GRPO of the agent on one Ray Train worker."""

    name = "grpo"
    config_class = GRPOJobConfig

    def __init__(self, cfg: GRPOJobConfig, run_dir: Path, n_rows: int, worker):
        super().__init__(cfg, run_dir, n_rows, worker)
        self.ref = None
        self.judge: Optional[RewardJudge] = None
        # Run totals, carried across resumes in trainer_state.json: the failure cap counts the whole run.
        self.counts: Counter = Counter()
        self.reasons: Counter = Counter()

    @property
    def encoder_options(self) -> dict:  # type: ignore[override]
        """Prompts (no target), room for the reply, and the sample's text fields for the rewards."""
        return {"with_target": False, "reserve": self.cfg.grpo.max_new_tokens, "with_meta": True}

    # ---- setup ---------------------------------------------------------------------------------------------------
    def build_engine(self, weights_from: Optional[Path]) -> TrainEngine:
        """The policy engine, and the frozen reference policy (the initial model, also after a resume)."""
        trained = super().build_engine(weights_from)
        self.ref = build_frozen_vlm(self.cfg.model, self.device, self.precision)
        return trained

    def setup(self) -> None:
        super().setup()
        plan = self.resume_plan
        if plan is not None and plan.checkpoint is not None:
            st = ckpt.read_state(plan.checkpoint).get("grpo", {})
            self.counts.update(st.get("counts", {}))
            self.reasons.update(st.get("failure_reasons", {}))
        if self.cfg.grpo.reward.uses_judge:
            from mmrole.data.prepared import load_manifest

            images_root = str(load_manifest(self.cfg.data.prepared)["images_root"])
            self.judge = RewardJudge(self.cfg, images_root, self.rank)

    def checkpoint_state(self) -> dict:
        st = super().checkpoint_state()
        st["grpo"] = {"counts": dict(self.counts), "failure_reasons": dict(self.reasons)}
        return st

    def train(self) -> None:
        """The held-out reward before any update (step 0: the baseline every later measurement pairs with), then
        the shared step loop."""
        if self.pos.step == 0 and self.data.n_eval > 0 and self.total_steps > 0:
            self.evaluate()
        super().train()

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()
        super().close()

    # ---- rollouts and rewards ------------------------------------------------------------------------------------
    def rollouts(self, prompts: list[dict], group: int, seed: int, step: int) -> list[Rollout]:
        g = self.cfg.grpo
        seeds = [[rollout_seed(seed, step, str(p["id"]), k) for k in range(group)] for p in prompts]
        return sample_rollouts(
            self.vlm, prompts, group, seeds, g.max_new_tokens, g.temperature, g.top_p, g.rollout_batch_size
        )

    def rewards(self, prompts: list[dict], rollouts: list[Rollout]) -> list[RolloutReward]:
        """One reward per rollout, judge calls batched over all of them."""
        s = self.cfg.grpo.reward
        metas = [json.loads(p[META]) for p in prompts]
        results: dict[str, list] = {}
        if s.uses_judge:
            reqs = [
                q
                for r in rollouts
                if r.error is None and r.text and r.text.strip()
                for q in judge_requests(r.rollout_id, r.text, metas[r.prompt], s.metrics)
            ]
            for res in self.judge.score(reqs):
                results.setdefault(res.sample_id, []).append(res)
        return [rollout_reward(r.text, metas[r.prompt], s, results.get(r.rollout_id), r.error) for r in rollouts]

    # ---- the step --------------------------------------------------------------------------------------------------
    def optimizer_step(self, micro: list[list[dict]], data_wait_s: float) -> StepOutcome:
        g = self.cfg.grpo
        G = g.group_size
        if len(micro) != self.geo.grad_accum:
            raise ValueError(f"a step takes {self.geo.grad_accum} micro-batches per rank, got {len(micro)}")
        step = self.pos.step + 1
        t0 = time.time()
        prompts = [p for rows in micro for p in rows]
        rollouts = self.rollouts(prompts, G, self.cfg.train.seed, step)
        t1 = time.time()
        rewards = self.rewards(prompts, rollouts)
        t2 = time.time()
        values = [r.value for r in rewards]
        adv, usable = group_advantages(values, G, g.normalize_std)
        failed = [r for r in rewards if not r.ok]
        local_reasons = Counter(failure_reason_key(r.error or "failed") for r in failed)

        # Per micro-batch: the usable rollouts of its prompts (prompt-major, G each), as training samples.
        per_micro: list[list[tuple[dict, float]]] = []
        start = 0
        for rows in micro:
            items = []
            for j in range(start * G, (start + len(rows)) * G):
                if usable[j]:
                    r = rollouts[j]
                    items.append((training_sample(prompts[r.prompt], r.token_ids), adv[j]))
            per_micro.append(items)
            start += len(rows)
        ok_vals = [v for v in values if v is not None]
        comp_sums = {c: sum(r.components.get(c, 0.0) for r in rewards if r.ok) for c in COMPONENTS}
        local = [
            len(rollouts),
            len(failed),
            sum(1 for r in rollouts if r.error is not None),
            float(sum(ok_vals)),
            float(sum(v * v for v in ok_vals)),
            float(len(ok_vals)),
            float(sum(int(s["num_target_tokens"]) for items in per_micro for s, _ in items)),  # reply tokens with loss
            float(sum(len(r.token_ids) for r in rollouts)),
            float(sum(r.finished for r in rollouts)),
            float(sum(usable)),
            len(prompts),
            *[comp_sums[c] for c in COMPONENTS],
        ]
        # Summed over ranks before any forward pass: the loss is the mean over every loss-carrying reply token.
        tot = allreduce_sum(local, self.device)
        n_roll, n_fail, n_roll_err, r_sum, r_sq, n_ok, n_tokens, gen_tokens, n_finished, n_usable, n_prompts = tot[:11]
        comp = dict(zip(COMPONENTS, tot[11:]))
        reasons = _allreduce_counter(local_reasons)
        self.counts.update({"rollouts": int(n_roll), "failed": int(n_fail), "rollout_errors": int(n_roll_err)})
        self.counts["steps"] += 1
        self.reasons.update(reasons)

        skipped = n_ok == 0
        totals = StepTotals(data_wait_s=data_wait_s, samples=int(n_prompts))
        pg_sum = kl_sum = clipped = 0.0
        if skipped:
            self.counts["skipped_steps"] += 1
            self.trained.scheduler.step()  # no update, but the LR schedule follows the step count (exact resume)
            if self.rank == 0:
                say(f"[mmrole] step {step}: every reward failed ({dict(reasons)}); skipped (no update)")
        else:
            pg_sum, kl_sum, clipped, loss_sum = self._update(per_micro, int(n_tokens), totals)
            totals.loss_sum = loss_sum / max(n_tokens, 1.0)
        t3 = time.time()
        mean = r_sum / n_ok if n_ok else None
        metrics: dict[str, Any] = {
            "reward_mean": mean,
            "reward_std": max(r_sq / n_ok - mean * mean, 0.0) ** 0.5 if mean is not None else None,
            "kl": kl_sum / n_tokens if n_tokens else 0.0,
            "pg_loss": pg_sum / n_tokens if n_tokens else 0.0,
            "clip_frac": clipped / n_tokens if n_tokens else 0.0,
            "rollouts": int(n_roll),
            "rollouts_failed": int(n_fail),
            "rollout_errors": int(n_roll_err),
            "rollouts_usable": int(n_usable),
            "failure_reasons": dict(reasons),
            "reply_tokens_mean": gen_tokens / max(n_roll, 1.0),
            "finished_frac": n_finished / max(n_roll, 1.0),
            "skipped": bool(skipped),
            "rollout_s": t1 - t0,
            "reward_s": t2 - t1,
            "update_s": t3 - t2,
            "run_rollouts": int(self.counts["rollouts"]),
            "run_failed": int(self.counts["failed"]),
        }
        for c in COMPONENTS:
            if comp[c] and n_ok:
                metrics[f"reward_{c}"] = comp[c] / n_ok
        share = self.counts["failed"] / max(self.counts["rollouts"], 1)
        metrics["run_failed_share"] = share
        stop = None
        if share > g.max_failed_share:
            stop = (
                f"failed rewards are {share:.1%} of {self.counts['rollouts']} rollouts, over "
                f"grpo.max_failed_share={g.max_failed_share:g} (reasons: {dict(self.reasons)})"
            )
        return StepOutcome(totals, metrics, stop)

    def _update(self, per_micro: list[list[tuple[dict, float]]], num_tokens: int, totals: StepTotals):
        """Forward/backward of every micro-batch (a filler with weight 0 where a micro-batch has no usable rollout)
        and the optimizer step. Returns the summed pg, kl, clipped counts and loss over ranks."""
        g = self.cfg.grpo
        engine = self.engine
        scale = backward_scale(self.world, num_tokens)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for items in per_micro:
            filler = not items
            samples = [self.batcher.filler] if filler else [s for s, _ in items]
            advs = [0.0] if filler else [a for _, a in items]
            batch, keep = self._left_padded(samples)
            labels = batch.pop("labels")
            logits = model_logits(engine, {**batch, "logits_to_keep": keep})
            logp, mask = token_logprobs(logits, labels[:, -keep:])
            with torch.no_grad():
                ref_logits = model_logits(self.ref.model, {**batch, "logits_to_keep": keep})
                ref_logp, _ = token_logprobs(ref_logits, labels[:, -keep:])
            out = grpo_token_loss(
                logp,
                logp.detach(),
                ref_logp,
                torch.tensor(advs, device=logp.device),
                mask,
                g.clip_eps,
                g.kl_coef,
            )
            loss = out.loss * 0.0 if filler else out.loss
            engine.backward(loss * scale, scale_wrt_gas=False)
            engine.step()
            if not filler:
                sums += torch.tensor(
                    [out.pg, out.kl, out.clipped, float(out.loss.detach())], dtype=torch.float64, device=self.device
                )
                totals.target_tokens += int(out.tokens)
                totals.text_tokens += sum(int(s["num_text_tokens"]) for s in samples)
                totals.image_tokens += sum(int(s.get("num_image_tokens", 0)) for s in samples)
            totals.micro_batches += 1
        dist.all_reduce(sums)
        counts = torch.tensor(
            [totals.target_tokens, totals.text_tokens, totals.image_tokens, totals.micro_batches],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(counts)
        totals.target_tokens, totals.text_tokens, totals.image_tokens, totals.micro_batches = (
            int(x) for x in counts.tolist()
        )
        pg, kl, clipped, loss = sums.tolist()
        return pg, kl, clipped, loss

    def _left_padded(self, samples: list[dict]) -> tuple[dict, int]:
        """A left-padded batch (every reply ends at the last column) and how many last positions hold every reply
        token and the one before it: only those positions' logits are computed (``logits_to_keep``), not the
        prompt's, which saves a ``[rows, prompt length, vocab]`` tensor per pass."""
        batch = self.vlm.pad_batch([model_inputs(s) for s in samples], padding_side="left")
        batch.pop("id", None)
        longest = max(int(s["num_target_tokens"]) for s in samples)
        width = batch["input_ids"].shape[1]
        return self.vlm.to_device(batch), min(width, longest + 1)

    # ---- validation: the policy's mean reward on held-out prompts ----------------------------------------------------
    def evaluate(self) -> Optional[dict]:
        """Mean reward of ``grpo.eval_group_size`` rollouts per held-out prompt, with fixed seeds (the same at every
        measurement of the run, so measurements pair prompt by prompt); per-prompt means are logged for paired
        tests. Collective."""
        if self.data.n_eval <= 0:
            return None
        g = self.cfg.grpo
        per_prompt: dict[str, Optional[float]] = {}
        failed = 0
        for rows in self.data.validation_batches():
            if not rows:
                continue
            rolls = self.rollouts(rows, g.eval_group_size, g.eval_seed, 0)
            rews = self.rewards(rows, rolls)
            for i, p in enumerate(rows):
                vals = [r.value for r in rews[i * g.eval_group_size : (i + 1) * g.eval_group_size] if r.ok]
                failed += g.eval_group_size - len(vals)
                per_prompt[str(p["id"])] = sum(vals) / len(vals) if vals else None
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (per_prompt, failed))
        merged: dict[str, Optional[float]] = {}
        for part, _ in gathered:
            merged.update(part)
        n_failed = sum(f for _, f in gathered)
        vals = [v for v in merged.values() if v is not None]
        rec = {
            "step": self.pos.step,
            "eval_reward": sum(vals) / len(vals) if vals else None,
            "eval_prompts": len(merged),
            "eval_failed": n_failed,
            "eval_rewards": dict(sorted(merged.items())),
        }
        shown = f"{rec['eval_reward']:.4f}" if rec["eval_reward"] is not None else "n/a"
        self.log_eval(rec, f"mean reward {shown} ({len(merged)} prompts, {n_failed} failed rollouts)")
        return rec


def _allreduce_counter(c: Counter) -> Counter:
    """A Counter summed over ranks (keys may differ by rank)."""
    world = dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, dict(c))
    out: Counter = Counter()
    for p in parts:
        out.update(p)
    return out


def grpo_verdict(max_failed_share: float):
    """The driver's check of a finished GRPO run (see :func:`mmrole.ray_train.run_training`'s ``verdict``): the
    run's rollout and failure counts from its last step record, an error when failures exceed the cap."""

    def verdict(run_dir: Path) -> tuple[Optional[str], dict]:
        from mmrole.train.metrics import read_metrics, step_records

        steps = step_records(read_metrics(run_dir))
        if not steps:
            return None, {}
        last = max(steps, key=lambda r: (r["step"], r["time"]))
        n, failed = int(last.get("run_rollouts", 0)), int(last.get("run_failed", 0))
        last_by_step: dict[int, dict] = {}
        for r in steps:
            last_by_step[r["step"]] = r
        reasons: Counter = Counter()
        for r in last_by_step.values():
            reasons.update(r.get("failure_reasons", {}))
        counts = {
            "rollouts": n,
            "rollouts_failed": failed,
            "failure_reasons": dict(reasons),
            "skipped_steps": sum(1 for r in last_by_step.values() if r.get("skipped")),
        }
        if n and failed / n > max_failed_share:
            return f"failed rewards {failed}/{n} exceed grpo.max_failed_share={max_failed_share:g}", counts
        return None, counts

    return verdict


def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker of a GRPO run runs."""
    run_on_ray_worker(GRPORecipe, config)
