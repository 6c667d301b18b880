"""Direct preference optimisation on Ray Train + DeepSpeed: the DPO step and its validation. The life of a worker
(resume, engine, data stream, checkpoints, logging, fault injection) is :class:`mmrole.ray_recipe.Recipe`, shared
with SFT; the rows are preference pairs (``RowEncoder(pairs=True)``: each row gives its chosen then its rejected
sample, same prompt). Losses are :mod:`mmrole.rl.dpo`.

The loss of a step is the mean over the pairs of the whole global batch: each micro-batch's summed pair loss is
scaled by ``world / pairs`` (DeepSpeed averages over ranks), so a pair weighs the same wherever it lands.

Reference log-probs (``dpo.reference``): ``precomputed`` runs every pair (training and held-out) once through the
starting policy before the first step (each rank its strided share, gathered, written to
``<run_dir>/reference_logps.jsonl``; a resumed run reads the file, so resume stays exact); ``online`` keeps a frozen
reference model beside the policy and scores each micro-batch with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mmrole.ray_recipe import Recipe, StepOutcome, run_on_ray_worker, say
from mmrole.ray_recipe_engine import TrainEngine, build_frozen_vlm
from mmrole.rl.dpo import AVERAGED, PairSums, dpo_loss
from mmrole.rl.dpo_config import DPOJobConfig, reference_model_config
from mmrole.rl.logprobs import token_logprobs
from mmrole.train.data_order import MicroBatchPlan
from mmrole.train.dist import allreduce_sum
from mmrole.train.row_encoder import REJECTED_SUFFIX
from mmrole.train.rows import batch_token_counts
from mmrole.train.step import StepTotals

REFERENCE_FILE = "reference_logps.jsonl"


def split_pairs(samples: list[dict]) -> tuple[list[dict], list[dict]]:
    """Interleaved [chosen, rejected, ...] encoded samples -> (chosen list, rejected list), checked by id."""
    chosen, rejected = samples[0::2], samples[1::2]
    if len(chosen) != len(rejected) or any(r["id"] != c["id"] + REJECTED_SUFFIX for c, r in zip(chosen, rejected)):
        raise RuntimeError(f"preference micro-batch is not (chosen, rejected) pairs: {[s['id'] for s in samples]}")
    return chosen, rejected


def reply_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed reply-token log-probs [B], reply token counts [B]) of a padded batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logp, mask = token_logprobs(model(**inputs).logits, batch["labels"])
    return logp.sum(-1), mask.sum(-1)


class DPORecipe(Recipe):
    """DPO on one Ray Train worker."""

    name = "dpo"
    config_class = DPOJobConfig
    encoder_options = {"pairs": True}

    cfg: DPOJobConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = None  # frozen VLM (dpo.reference: online)
        self.ref_table: Optional[dict[str, list[float]]] = (
            None  # id -> [chosen sum, chosen n, rejected sum, rejected n]
        )

    # ---- models ----------------------------------------------------------------------------------------------------
    def build_engine(self, weights_from: Optional[Path]) -> TrainEngine:
        if self.cfg.dpo.reference == "online":
            # Built before the engine: under ZeRO-3 the engine's model is created partitioned (zero.Init), the frozen
            # reference must not be.
            self.reference = build_frozen_vlm(reference_model_config(self.cfg), self.device, self.precision)
        return super().build_engine(weights_from)

    def setup_data(self) -> None:
        super().setup_data()
        if self.cfg.dpo.reference == "precomputed":
            self.ref_table = self._reference_table()

    def _reference_table(self) -> dict[str, list[float]]:
        """The precomputed reference log-probs of every pair: read from the run dir, or computed now (collective)."""
        path = self.run_dir / REFERENCE_FILE
        exists = bool(allreduce_sum([float(path.is_file()) if self.rank == 0 else 0.0], self.device)[0])
        if not exists:
            self._compute_reference_table(path)
        table: dict[str, list[float]] = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                table[rec["id"]] = rec["ref"]
        return table

    def _compute_reference_table(self, path: Path) -> None:
        fresh = self.pos.step == 0 and not self.cfg.dpo.reference_model
        # At step 0 the policy *is* the reference; later (file lost) or for another reference model, a frozen copy.
        frozen = None if fresh else build_frozen_vlm(reference_model_config(self.cfg), self.device, self.precision)
        model = self.engine if frozen is None else frozen.model
        batcher = self.batcher if frozen is None else type(self.batcher)(self.cfg, frozen)
        total = self.n_rows + self.data.n_eval
        mine = list(range(self.rank, total, self.world))
        mb = self.cfg.train.micro_batch_size
        plans = [MicroBatchPlan(-1, tuple(mine[i : i + mb]), 0) for i in range(0, len(mine), mb)]
        local: list[dict] = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for _, encoded in self.data.encoders.encode_local(plans):
                if not encoded.samples:
                    continue
                c, r = split_pairs(encoded.samples)
                sums, counts = reply_logprobs(model, batcher(c + r))
                n = len(c)
                for i, s in enumerate(c):
                    local.append(
                        {
                            "id": s["id"],
                            "ref": [float(sums[i]), float(counts[i]), float(sums[n + i]), float(counts[n + i])],
                        }
                    )
        if was_training:
            model.train()
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, local)
        if self.rank == 0:
            rows = sorted((rec for part in gathered for rec in part), key=lambda rec: rec["id"])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in rows:
                    f.write(json.dumps(rec) + "\n")
            os.replace(tmp, path)
            say(f"[mmrole] reference log-probs of {len(rows)} pairs precomputed: {path}")
        dist.barrier()
        del frozen

    def _reference_logps(self, chosen: list[dict], rejected: list[dict], batch: dict, average: bool):
        """Reference (chosen, rejected) log-probs of a micro-batch, sums or per-token means."""
        if self.reference is not None:
            with torch.no_grad():
                sums, counts = reply_logprobs(self.reference.model, batch)
            n = len(chosen)
            vals = sums / counts.clamp(min=1.0) if average else sums
            return vals[:n], vals[n:]
        rows = []
        for c in chosen:
            if c["id"] not in self.ref_table:
                raise RuntimeError(f"pair {c['id']!r}: no precomputed reference log-probs in {REFERENCE_FILE}")
            rows.append(self.ref_table[c["id"]])
        t = torch.tensor(rows, dtype=torch.float32, device=self.device).reshape(-1, 4)
        if average:
            return t[:, 0] / t[:, 1].clamp(min=1.0), t[:, 2] / t[:, 3].clamp(min=1.0)
        return t[:, 0], t[:, 2]

    # ---- one micro-batch -------------------------------------------------------------------------------------------
    def _pair_forward(self, rows: list[dict]):
        """Policy and reference log-probs of this micro-batch's pairs and the per-pair DPO output (an empty
        micro-batch runs a filler pair, to be weighted 0)."""
        d = self.cfg.dpo
        average = AVERAGED[d.loss]
        if rows:
            chosen, rejected = split_pairs(rows)
        else:
            filler = dict(self.batcher.filler)
            chosen, rejected = [filler], [dict(filler, id=filler["id"] + REJECTED_SUFFIX)]
        batch = self.batcher(chosen + rejected)
        sums, counts = reply_logprobs(self.engine, batch)
        vals = sums / counts.clamp(min=1.0) if average else sums
        n = len(chosen)
        pc, pr = vals[:n], vals[n:]
        if rows:
            rc, rr = self._reference_logps(chosen, rejected, batch, average)
        else:
            rc, rr = pc.detach(), pr.detach()
        return dpo_loss(pc, pr, rc, rr, beta=d.beta, loss=d.loss, label_smoothing=d.label_smoothing), pc, pr

    def optimizer_step(self, micro: list[list[dict]], data_wait_s: float) -> StepOutcome:
        if len(micro) != self.geo.grad_accum:
            raise ValueError(f"a step takes {self.geo.grad_accum} micro-batches per rank, got {len(micro)}")
        engine = self.engine
        n_pairs = int(allreduce_sum([sum(len(rows) // 2 for rows in micro)], self.device)[0])
        scale = float(self.world) / float(max(n_pairs, 1))
        totals = StepTotals(data_wait_s=data_wait_s)
        sums = PairSums()
        for rows in micro:
            out, pc, pr = self._pair_forward(rows)
            loss = out.losses.sum() * scale
            if not rows:
                loss = loss * 0.0
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()
            if rows:
                sums.add(out, pc, pr)
            text_t, img_t, tgt_t = batch_token_counts(rows)
            totals.micro_batches += 1
            totals.samples += len(rows) // 2
            totals.text_tokens += text_t
            totals.image_tokens += img_t
            totals.target_tokens += tgt_t
        local = torch.tensor(totals.as_list() + sums.as_list(), dtype=torch.float64, device=self.device)
        dist.all_reduce(local)
        values = local.tolist()
        k = len(totals.as_list())
        summed = StepTotals.from_list(values[:k])
        pairs = PairSums.from_list(values[k:])
        summed.loss_sum = pairs.loss / max(pairs.pairs, 1.0)  # the mean pair loss of the step
        metrics = pairs.means()
        metrics.pop("dpo_loss")
        return StepOutcome(summed, metrics)

    def evaluate(self) -> Optional[dict]:
        """DPO loss, reward accuracy and margin on the held-out pairs (each rank a fixed strided share)."""
        if self.data.n_eval <= 0:
            return None
        sums = PairSums()
        self.engine.eval()
        with torch.no_grad():
            for rows in self.data.validation_batches():
                out, pc, pr = self._pair_forward(rows)
                if rows:
                    sums.add(out, pc, pr)
        self.engine.train()
        t = torch.tensor(sums.as_list(), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        total = PairSums.from_list(t.tolist())
        means = total.means("eval_")
        rec = {"step": self.pos.step, "eval_loss": means.pop("eval_dpo_loss"), **means}
        self.log_eval(
            rec,
            f"dpo loss {rec['eval_loss']:.4f}, reward accuracy {rec['eval_reward_accuracy']:.3f}, margin "
            f"{rec['eval_reward_margin']:.4f} ({rec['eval_pairs']} pairs)",
        )
        return rec

    def close(self) -> None:
        self.reference = None
        super().close()


def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker of a DPO run runs: build the recipe and run it."""
    run_on_ray_worker(DPORecipe, config)
