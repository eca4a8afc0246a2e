"""Worker-side machinery every Ray Train stage shares: DeepSpeed engine, resume, data order, the
optimizer-step loop with its eval / checkpoint / progress cadence, and gathering weights for export.

A stage's worker function builds its model(s), then hands ``TrainingSession.run`` a ``loss_fn`` (what one
micro-batch costs) and an ``eval_fn`` (what an evaluation reports); everything that must be identical
across stages — exact mid-epoch resume, ZeRO-3-safe collectives, fault drills — lives here once.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from raydist.core.data import IGNORE_INDEX, collate, iter_rows
from raydist.core.evaluation import perplexity, sum_nll
from raydist.core.progress import ProgressPrinter, append_jsonl, console, read_history
from raydist.core.resources import assigned_accelerators, unit_device
from raydist.core.runs import quiet_ray_worker_logs
from raydist.core.storage import Mirror
from raydist.train.plumbing import adamw, deepspeed_config, lr_lambda, param_groups, rng_state, set_rng_state

_CKPT_TAG = "state"

# (this rank's micro-batch on the device, target tokens of the whole optimizer step over all ranks and
# micro-batches) -> the scalar to backpropagate. DeepSpeed averages gradients over ranks and micro-batches,
# so a summed loss scaled by world * grad_accum / step_targets gives an exact per-token mean.
LossFn = Callable[[dict[str, torch.Tensor], int], torch.Tensor]
EvalFn = Callable[[], dict[str, float]]


class TrainingSession:
    """One data-parallel rank's view of a run. ``config`` is the dict the driver passed to the workers
    (``cfg``, ``run_dir``, ``total_steps``, ``micro_per_epoch``, ``n_eval``, ``device``, ``fault``); ``cfg``
    is the validated stage config (it has ``train``, ``data``, ``optim``, ``deepspeed``, ``run``)."""

    def __init__(self, config: dict[str, Any], cfg, pad_id: int):
        import ray.train

        quiet_ray_worker_logs()  # Ray Train's "Reporting training result ..." only with --verbose

        # The device comes from what Ray gave this worker (never from the driver, which may be a CPU-only
        # head); DeepSpeed reads its accelerator from DS_ACCELERATOR when first asked, which is below.
        self.device = unit_device(config["device"], "training worker", train_worker=True)
        os.environ["DS_ACCELERATOR"] = "cuda" if self.device.type == "cuda" else "cpu"
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.cfg = cfg
        self.config = config
        # The run directory may be a URI: this rank works in a local mirror of it and pushes what it writes
        # (metrics.jsonl, the artifact); for a local run the mirror is the directory itself.
        self.storage = Mirror(config["run_dir"], role=f"rank{self.rank}")
        self.run_dir = self.storage.local
        if self.rank == 0:
            self.storage.pull("metrics.jsonl")  # a restarted rank 0 (maybe on another node) appends to it
        self.total_steps: int = config["total_steps"]
        self.micro_per_epoch: int = config["micro_per_epoch"]
        self.bf16 = self.device.type == "cuda"
        self.pad_id = pad_id
        self.step, self.micro = 0, 0
        self.engine = None
        self.first_eval: dict[str, float] = {}
        self.progress: Optional[ProgressPrinter] = None
        self.eval_rows = self._materialize("eval", config["n_eval"])

    # ------------------------------------------------------------------------------------ set-up

    def build_engine(self, model: torch.nn.Module):
        """AdamW + warmup/decay schedule + the DeepSpeed engine around ``model`` (the trainable one)."""
        import deepspeed

        cfg = self.cfg
        optimizer = adamw(param_groups(model, cfg.optim.weight_decay), cfg.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, self.total_steps))
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(
                cfg.deepspeed,
                micro_batch_size=cfg.train.micro_batch_size,
                grad_accum_steps=cfg.train.grad_accum_steps,
                grad_clip=cfg.optim.grad_clip,
                bf16=self.bf16,
            ),
        )
        return self.engine

    def restore(self) -> None:
        """Resume from Ray Train's latest checkpoint: weights, optimizer, scheduler (DeepSpeed), step and
        data position (client state), and this rank's RNG streams."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as ckpt_dir:
            _, client = self.engine.load_checkpoint(ckpt_dir, tag=_CKPT_TAG)
            self.step, self.micro = client["step"], client["micro"]
            set_rng_state(torch.load(Path(ckpt_dir) / f"rng_rank{self.rank}.pt", weights_only=False))
        if self.rank == 0:
            console(f"[raydist] resumed from step {self.step}/{self.total_steps}")
            self.log({"event": "resumed", "step": self.step})

    # ----------------------------------------------------------------------------- eval / report

    def log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            append_jsonl(self.run_dir / "metrics.jsonl", record)
            self.storage.push("metrics.jsonl")

    def publish(self, rel: str) -> None:
        """Make ``run_dir/rel`` (e.g. the exported artifact, manifest last) visible at the run's location."""
        self.storage.push(rel)

    def nll_of(self, module: torch.nn.Module) -> tuple[float, int]:
        """Summed NLL and token count of ``module`` over the whole eval set (a collective: every rank
        calls it; each evaluates its share)."""
        import torch.distributed as dist

        nll, n = sum_nll(module, self._eval_batches(), self.device)
        totals = torch.tensor([nll, float(n)], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return float(totals[0]), int(totals[1])

    def model_eval(self) -> dict[str, float]:
        """Eval loss / perplexity of the model being trained."""
        self.engine.eval()
        nll, n = self.nll_of(self.engine.module)
        self.engine.train()
        return {"eval_loss": nll / n if n else float("nan"), "eval_ppl": perplexity(nll, n), "eval_tokens": n}

    def _log_eval(self, m: dict[str, float]) -> None:
        self.log({"step": self.step, **m})
        if self.rank == 0:
            extra = "".join(f" {k} {v:.4g}" for k, v in m.items() if k not in ("eval_loss", "eval_ppl", "eval_tokens"))
            console(f"[raydist] eval step {self.step}: loss {m['eval_loss']:.4f} ppl {m['eval_ppl']:.3f}{extra}")

    def _save_and_report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=_CKPT_TAG, client_state={"step": self.step, "micro": self.micro})
            torch.save(rng_state(), Path(tmp) / f"rng_rank{self.rank}.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # ---------------------------------------------------------------------------------- the loop

    def run(self, loss_fn: LossFn, eval_fn: Optional[EvalFn] = None) -> bool:
        """Train from the restored step to ``total_steps`` (or ``run.stop_after_steps``).

        Args:
            loss_fn: see ``LossFn``; gets this rank's micro-batch (``input_ids``/``labels``/``attention_mask``
                [b, T] on the device) and the step's global target-token count.
            eval_fn: → metrics with at least ``eval_loss``/``eval_ppl``; default ``model_eval``.

        Returns:
            True when the run reached ``total_steps`` (export next), False when it stopped early on purpose.
        """
        import ray.train
        import torch.distributed as dist

        cfg, engine = self.cfg, self.engine
        eval_fn = eval_fn or self.model_eval
        gas = cfg.train.grad_accum_steps
        evaluating = bool(self.eval_rows)
        if evaluating and cfg.train.eval_at_start and self.step == 0:
            self.first_eval = eval_fn()
            self._log_eval(self.first_eval)
            ray.train.report({"step": 0, **self.first_eval})

        self._log_placement()
        self.progress = ProgressPrinter(self.total_steps, start_step=self.step, enabled=self.rank == 0)
        engine.train()
        stop_at = min(self.total_steps, cfg.run.stop_after_steps or self.total_steps)
        batches = prefetched(self._micro_batches(), depth=2)
        while self.step < stop_at:
            # One optimizer step's micro-batches are drawn together so a loss can be normalised by the
            # target-token count of the whole step (all micro-batches, all ranks) — see ``LossFn``.
            # This rank's seconds per phase (logged with the step): waiting for data, the loss (the model's
            # forward, plus whatever the stage adds: a teacher, generation), DeepSpeed's backward (with
            # ZeRO's gradient reduction) and its step (clipping, optimizer, parameter gather). On a GPU, kernels
            # run asynchronously: a phase's time lands where the host next waits, so the split is approximate.
            phases = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
            t0 = time.perf_counter()
            group = [next(batches) for _ in range(gas)]
            phases["data"] = time.perf_counter() - t0
            step_targets = sum(g[2] for g in group)
            step_loss, step_tokens = 0.0, 0
            for batch, global_tokens, _ in group:
                t0 = time.perf_counter()
                loss = loss_fn({k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, step_targets)
                t1 = time.perf_counter()
                engine.backward(loss)
                t2 = time.perf_counter()
                engine.step()
                step_loss += loss.item() / gas
                t3 = time.perf_counter()
                phases["forward"] += t1 - t0
                phases["backward"] += t2 - t1
                phases["optimizer"] += t3 - t2
                step_tokens += global_tokens
                self.micro += 1
            self.step += 1
            loss_t = torch.tensor([step_loss], dtype=torch.float64, device=self.device)
            dist.all_reduce(loss_t)
            mean_loss = float(loss_t) / self.world
            lr = engine.get_lr()[0]
            tok_s = self.progress.update(self.step, loss=mean_loss, lr=lr, tokens=step_tokens)
            if self.step % cfg.train.log_every == 0 or self.step == stop_at:
                phase_s = {k: round(v, 4) for k, v in phases.items()}
                self.log({"step": self.step, "loss": mean_loss, "lr": lr, "tokens_per_s": tok_s, "phase_s": phase_s})
            self._maybe_fault()

            metrics: dict[str, Any] = {"step": self.step, "loss": mean_loss, "lr": lr}
            at_end = self.step == stop_at
            every = cfg.train.eval_every
            if evaluating and ((every and self.step % every == 0) or (at_end and self.step == self.total_steps)):
                m = eval_fn()
                self._log_eval(m)
                metrics.update(m)
            if at_end or (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0):
                self._save_and_report(metrics)
            elif "eval_loss" in metrics:
                ray.train.report(metrics)
        return self.step >= self.total_steps

    def _log_placement(self) -> None:
        """Record where every rank runs (node, pid, device, GPU ids) in metrics.jsonl (a collective)."""
        import torch.distributed as dist

        mine = {"rank": self.rank, "pid": os.getpid(), "device": str(self.device), **assigned_accelerators()}
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        self.log({"event": "workers", "step": self.step, "workers": everyone})

    def _micro_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], int, int]]:
        """This rank's micro-batches from the current data position on, forever (the loop stops it).

        Every rank reads the same global batch (``micro_batch_size x world`` rows, in a deterministic
        per-epoch shuffled order) and keeps its slice; so the position is one integer (``micro``) and a
        resumed run sees exactly the rows the interrupted one would have. Also yields the global batch's
        token and target-token counts, known to every rank without a collective.
        """
        import ray.train

        mb, world = self.cfg.train.micro_batch_size, self.world
        shard = ray.train.get_dataset_shard("train")
        buf = self.cfg.data.shuffle_buffer
        # Our own position: the prefetching thread runs ahead of ``self.micro`` (what was trained on).
        position = self.micro
        while True:
            epoch, skip = divmod(position, self.micro_per_epoch)
            batches = shard.iter_batches(
                batch_size=mb * world,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=buf or None,
                local_shuffle_seed=(self.cfg.train.seed + epoch) if buf else None,
            )
            for i, batch in enumerate(batches):
                if i < skip:  # mid-epoch resume: skip what the interrupted run already trained on
                    continue
                if i >= self.micro_per_epoch:
                    break
                rows = list(iter_rows(batch))
                tokens = sum(len(r["input_ids"]) for r in rows)
                targets = sum(int((np.asarray(r["labels"][1:]) != IGNORE_INDEX).sum()) for r in rows)
                batch = collate(rows[self.rank * mb : (self.rank + 1) * mb], self.pad_id)
                if self.device.type == "cuda":  # page-locked, so the copy to the GPU can be asynchronous
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                position += 1
                yield batch, tokens, targets

    def _maybe_fault(self) -> None:
        """The fault drill (see ``_fault_from_env`` in the stages): the last rank dies once, hard."""
        fault = self.config.get("fault")
        if fault and self.step == fault["step"] and self.rank == self.world - 1 and not os.path.exists(fault["marker"]):
            Path(fault["marker"]).write_text(f"killed rank {self.rank} at step {self.step}\n")
            os._exit(1)  # as when a node dies: no cleanup, no report

    # ------------------------------------------------------------------------------------ export

    def gather_state(self) -> Optional[dict[str, torch.Tensor]]:
        """The full state dict of the trained module on rank 0 (None elsewhere); all ranks must call."""
        if self.cfg.deepspeed.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}

    def summary_metrics(self) -> dict[str, Any]:
        """Before/after eval metrics and throughput from this run's history (rank 0)."""

        history = read_history(self.run_dir / "metrics.jsonl")
        evals = [h for h in history if "eval_loss" in h]
        trains = [h for h in history if "tokens_per_s" in h]
        out: dict[str, Any] = {"steps": self.total_steps}
        start = self.first_eval or (evals[0] if evals else None)
        if start:
            out.update(eval_loss_before=start["eval_loss"], eval_ppl_before=start["eval_ppl"])
        if evals:
            out.update({k: v for k, v in evals[-1].items() if k not in ("step", "time", "eval_tokens")})
        if trains:
            mean = self.progress.mean_tokens_per_s() if self.progress else None
            out.update(train_loss=trains[-1]["loss"], tokens_per_s=mean or trains[-1]["tokens_per_s"])
        return out

    # ------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _materialize(name: str, n: int) -> list[dict[str, Any]]:
        import ray.train

        if not n:
            return []
        rows: list[dict[str, Any]] = []
        for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=256, batch_format="numpy"):
            rows.extend(iter_rows(batch))
        return rows

    def _eval_batches(self):
        """This rank's eval batches. Every rank yields the same number of batches (dummy ones with weight 0
        where it has run out) because under ZeRO-3 each forward is a collective."""
        rows, rank, world, mb = self.eval_rows, self.rank, self.world, self.cfg.train.micro_batch_size
        mine = rows[rank::world]
        n_batches = math.ceil(math.ceil(len(rows) / world) / mb)
        for i in range(n_batches):
            chunk_rows = mine[i * mb : (i + 1) * mb]
            if chunk_rows:
                yield collate(chunk_rows, self.pad_id)
            else:
                yield {**collate(rows[:1], self.pad_id), "weight": 0}


def prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """``items`` produced by a background thread up to ``depth`` ahead of the consumer.

    The training loop's host-side work between steps (reading Ray Data blocks, building and padding
    tensors, the teacher cache's [B, T, k] columns) then overlaps the device's compute instead of
    leaving the GPU idle (on an H200, host work was most of a SmolLM2-sized distillation step; BENCHMARKS.md).
    An exception in the producer is raised in the consumer at the item where it happened.
    """
    import queue
    import threading

    q: "queue.Queue[tuple[str, Any]]" = queue.Queue(maxsize=depth)

    def produce() -> None:
        try:
            for item in items:
                q.put(("item", item))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("error", e))
        else:
            q.put(("end", None))

    threading.Thread(target=produce, name="raydist-prefetch", daemon=True).start()
    while True:
        kind, value = q.get()
        if kind == "error":
            raise value
        if kind == "end":
            return
        yield value
