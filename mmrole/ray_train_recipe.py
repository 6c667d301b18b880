"""Supervised fine-tuning on Ray Train + DeepSpeed (the agent, and the reward model on judge data): the SFT step and
its validation. The life of a worker (resume, engine, data stream, checkpoints, logging) is :mod:`mmrole.ray_recipe`.

The loss is token-weighted over the whole global batch (:mod:`mmrole.train.step`): each target token weighs the
same whatever micro-batch or rank it lands on.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from mmrole.ray_recipe import Recipe, StepOutcome, run_on_ray_worker
from mmrole.ray_recipe import WorkerInfo as WorkerInfo  # re-exported: the recipe's constructor takes one
from mmrole.train.dist import allreduce_sum
from mmrole.train.rows import batch_token_counts
from mmrole.train.step import StepTotals, backward_scale, count_target_tokens, summed_token_loss


class SFTRecipe(Recipe):
    """Supervised fine-tuning on one Ray Train worker (agent or reward model: same loss on the target tokens)."""

    name = "sft"

    def optimizer_step(self, micro: list[list[dict]], data_wait_s: float) -> StepOutcome:
        return StepOutcome(self.train_step(micro, data_wait_s))

    def train_step(self, micro: list[list[dict]], data_wait_s: float = 0.0) -> StepTotals:
        """Forward/backward over this rank's ``micro`` (one list of encoded samples per micro-batch; an empty list
        runs a filler sample with zero weight) and the optimizer step. Returns the totals summed over ranks."""
        if len(micro) != self.geo.grad_accum:
            raise ValueError(f"a step takes {self.geo.grad_accum} micro-batches per rank, got {len(micro)}")
        engine = self.engine
        local_tokens = sum(count_target_tokens(s["labels"]) for rows in micro for s in rows)
        num_tokens = int(allreduce_sum([local_tokens], self.device)[0])  # before any forward pass
        scale = backward_scale(self.world, num_tokens)
        totals = StepTotals(data_wait_s=data_wait_s)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for rows in micro:
            summed = summed_token_loss(engine, self.batcher(rows))
            if not rows:
                summed = summed * 0.0
            engine.backward(summed * scale, scale_wrt_gas=False)
            engine.step()
            loss_sum += summed.detach().float()  # stays on the device: no host sync per micro-step
            text_t, img_t, tgt_t = batch_token_counts(rows)
            totals.micro_batches += 1
            totals.samples += len(rows)
            totals.text_tokens += text_t
            totals.image_tokens += img_t
            totals.target_tokens += tgt_t
        local = torch.stack(
            [loss_sum.double()]
            + [torch.tensor(float(v), dtype=torch.float64, device=self.device) for v in totals.as_list()[1:]]
        )
        dist.all_reduce(local)
        summed_totals = StepTotals.from_list(local.tolist())
        summed_totals.loss_sum = summed_totals.loss_sum / max(num_tokens, 1)  # now the token-weighted mean
        return summed_totals

    def evaluate(self) -> Optional[dict]:
        """Token-weighted loss on the held-out rows (each rank a fixed strided share; collective)."""
        if self.data.n_eval <= 0:
            return None
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = samples = 0
        self.engine.eval()
        with torch.no_grad():
            for rows in self.data.validation_batches():
                summed = summed_token_loss(self.engine, self.batcher(rows)).double()
                if rows:
                    loss_sum += summed
                    tokens += sum(count_target_tokens(s["labels"]) for s in rows)
                    samples += len(rows)
        self.engine.train()
        t = torch.tensor([0.0, float(tokens), float(samples)], dtype=torch.float64, device=self.device)
        t[0] = loss_sum
        dist.all_reduce(t)
        total_loss, total_tokens, total_samples = t.tolist()
        rec = {
            "step": self.pos.step,
            "eval_loss": total_loss / max(total_tokens, 1.0),
            "eval_samples": int(total_samples),
            "eval_target_tokens": int(total_tokens),
        }
        self.log_eval(rec, f"loss {rec['eval_loss']:.4f} ({rec['eval_samples']} samples)")
        return rec


def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker of an SFT run runs: build the recipe and run it."""
    run_on_ray_worker(SFTRecipe, config)
