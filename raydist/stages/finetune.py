"""The fine-tuning stage: `raydist finetune`, read top to bottom.

Driver (``run_finetune``): check the config, open or resume the run directory, tokenize once into Parquet,
start a Ray Train ``TorchTrainer`` whose workers run ``train_loop_per_worker``, then draw the loss curve
and print where the artifact is.

Worker (``train_loop_per_worker``): a top-level function taking a plain dict, so it pickles; it builds the
model, wraps it in DeepSpeed, restores the latest Ray Train checkpoint if there is one, trains, evaluates,
checkpoints through ``ray.train.report`` and exports the artifact at the end.

Run directory (``<run.output_dir>/<run.name>``):
  config.yaml        the resolved config (a rerun must match it to resume)
  data/              tokenized train/eval Parquet (written once)
  checkpoint_*/      Ray Train checkpoints (DeepSpeed state + per-rank RNG)
  metrics.jsonl      every logged step and eval
  loss_curve.png     train and eval loss against step
  artifact/          the exported model + raydist.json
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from raydist.components.artifact import write_manifest
from raydist.components.data import build_datasets, collate, count_target_tokens, iter_rows
from raydist.components.models import hash_model_source, load_model, load_model_config, load_tokenizer, resolve_model_source
from raydist.components.preflight import PreflightError, preflight_finetune
from raydist.components.progress import ProgressPrinter, append_jsonl, console, plot_loss_curve, read_history
from raydist.components.training import (
    apply_dropout,
    deepspeed_config,
    lr_lambda,
    param_groups,
    perplexity,
    rng_state,
    seed_everything,
    set_rng_state,
    sum_nll,
)
from raydist.config.finetune import FinetuneConfig
from raydist.stages.common import (
    data_fingerprint,
    init_ray,
    open_run_dir,
    resolve_use_gpu,
    with_absolute_paths,
    write_examples_parquet,
)

ARTIFACT_DIR = "artifact"
_CKPT_TAG = "state"


# ----------------------------------------------------------------------------------------------- driver


def run_finetune(cfg: FinetuneConfig, *, verbose: bool = True) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with Ray Train + DeepSpeed; return the artifact directory.

    If ``run.stop_after_steps`` is set the run checkpoints and stops there; rerunning the same config
    resumes it. Returns the run directory in that case (no artifact yet).

    Raises:
        PreflightError / ConfigError / RunDirError: before any worker starts.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    report, tokenizer = preflight_finetune(cfg)
    cfg = with_absolute_paths(cfg)
    run_dir, resuming = open_run_dir(cfg, ARTIFACT_DIR)
    say = print if verbose else (lambda *a, **k: None)
    say(f"[raydist] run dir: {run_dir} ({'resuming' if resuming else 'new run'})")

    # Tokenize once; a resumed run reuses the same files so its data order is identical.
    data_dir = run_dir / "data"
    fp = data_fingerprint(cfg.data, cfg.model, cfg.train.seed)
    if not (data_dir / "fingerprint.txt").is_file() or (data_dir / "fingerprint.txt").read_text() != fp:
        t0 = time.time()
        train_ex, eval_ex = build_datasets(cfg.data, tokenizer, cfg.train.seed)
        write_examples_parquet(data_dir, {"train": train_ex, "eval": eval_ex}, fp)
        say(f"[raydist] tokenized {len(train_ex)} train / {len(eval_ex)} eval sequences in {time.time() - t0:.1f}s")
    counts = json.loads((data_dir / "counts.json").read_text())
    world = cfg.scaling.num_workers
    global_rows = cfg.train.micro_batch_size * world
    micro_per_epoch = counts["train"] // global_rows
    if micro_per_epoch < cfg.train.grad_accum_steps:
        raise PreflightError(
            f"the training data has {counts['train']} sequences, fewer than one optimizer step needs "
            f"({global_rows * cfg.train.grad_accum_steps} = micro_batch_size x num_workers x grad_accum_steps)"
        )
    total_steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * micro_per_epoch) // cfg.train.grad_accum_steps)

    init_ray(world * cfg.scaling.cpus_per_worker)
    ray.data.DataContext.get_current().enable_progress_bars = False  # they garble the progress lines
    use_gpu = resolve_use_gpu(cfg.scaling.use_gpu, world)
    train_ds = ray.data.read_parquet(str(data_dir / "train.parquet"))
    datasets = {"train": train_ds}
    if counts["eval"]:
        datasets["eval"] = ray.data.read_parquet(str(data_dir / "eval.parquet"))

    from ray.data import ExecutionOptions

    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "total_steps": total_steps,
        "micro_per_epoch": micro_per_epoch,
        "n_eval": counts["eval"],
        "use_gpu": use_gpu,
        "fault": _fault_from_env(),
        "parent": {"kind": report.model_kind, "path": resolve_model_source(cfg.model).describe()},
    }
    worker_env = {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu", "TOKENIZERS_PARALLELISM": "false"}
    if "RAYDIST_CACHE" in os.environ:
        worker_env["RAYDIST_CACHE"] = os.environ["RAYDIST_CACHE"]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=world, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env},
        ),
        datasets=datasets,
        # Every worker reads the whole (already tokenized) stream and keeps its rank's rows of each global
        # batch: a deterministic order is what makes mid-epoch resume exact, which Ray Data's dynamic
        # streaming_split does not promise.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    say(f"[raydist] training {total_steps} steps on {world} {'GPU' if use_gpu else 'CPU'} workers "
        f"(ZeRO-{cfg.deepspeed.zero_stage}{', LoRA' if cfg.lora.enabled else ''})")
    trainer.fit()

    history = read_history(run_dir / "metrics.jsonl")
    plot_loss_curve(history, run_dir / "loss_curve.png", title=f"{run_dir.name} ({'LoRA' if cfg.lora.enabled else 'full'})")
    artifact = run_dir / ARTIFACT_DIR
    if not artifact.is_dir():
        say(f"[raydist] stopped after step {cfg.run.stop_after_steps}; rerun the same command to resume")
        return run_dir
    say(f"[raydist] loss curve: {run_dir / 'loss_curve.png'}")
    say(f"[raydist] artifact: {artifact}")
    return artifact


def _fault_from_env() -> Optional[dict[str, Any]]:
    """Fault-injection drill for tests and chaos runs: kill the last worker once at a given step.

    ``RAYDIST_FAULT_AT_STEP=k`` and ``RAYDIST_FAULT_MARKER=/path``: the marker file records that the fault
    happened, so the restarted worker does not die again.
    """
    step = os.environ.get("RAYDIST_FAULT_AT_STEP")
    if not step:
        return None
    return {"step": int(step), "marker": os.environ["RAYDIST_FAULT_MARKER"]}


# ----------------------------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One data-parallel rank: DeepSpeed-wrapped model, resume, train, eval, checkpoint, export."""
    import ray.train
    import ray.train.torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["use_gpu"] else "cpu")
    import deepspeed
    import torch.distributed as dist

    cfg = FinetuneConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = Path(config["run_dir"])
    total_steps, micro_per_epoch = config["total_steps"], config["micro_per_epoch"]
    gas, mb = cfg.train.grad_accum_steps, cfg.train.micro_batch_size
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    bf16 = device.type == "cuda"

    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, seed=cfg.train.seed)
    if cfg.train.dropout is not None:
        apply_dropout(model, cfg.train.dropout)
    if cfg.lora.enabled:
        from peft import get_peft_model

        from raydist.components.export import peft_lora_config

        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, peft_lora_config(cfg.lora))

    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(
            cfg.deepspeed, micro_batch_size=mb, grad_accum_steps=gas, grad_clip=cfg.optim.grad_clip, bf16=bf16
        ),
    )

    # ---- resume: model, optimizer, scheduler (DeepSpeed), step and data position (client state), RNG.
    step, micro = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _, client = engine.load_checkpoint(ckpt_dir, tag=_CKPT_TAG)
            step, micro = client["step"], client["micro"]
            set_rng_state(torch.load(Path(ckpt_dir) / f"rng_rank{rank}.pt", weights_only=False))
        if rank == 0:
            console(f"[raydist] resumed from step {step}/{total_steps}")
            append_jsonl(run_dir / "metrics.jsonl", {"event": "resumed", "step": step})

    eval_rows = _materialize("eval", config["n_eval"])
    pad_id = tokenizer.pad_token_id

    def evaluate() -> dict[str, float]:
        engine.eval()
        nll, n = sum_nll(engine.module, _eval_batches(eval_rows, rank, world, mb, pad_id), device)
        totals = torch.tensor([nll, float(n)], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        engine.train()
        loss = float(totals[0] / totals[1]) if totals[1] else float("nan")
        return {"eval_loss": loss, "eval_ppl": perplexity(float(totals[0]), int(totals[1])), "eval_tokens": int(totals[1])}

    def save_and_report(metrics: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=_CKPT_TAG, client_state={"step": step, "micro": micro})
            torch.save(rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def log_eval(m: dict[str, float]) -> None:
        if rank == 0:
            append_jsonl(run_dir / "metrics.jsonl", {"step": step, **m})
            console(f"[raydist] eval step {step}: loss {m['eval_loss']:.4f} ppl {m['eval_ppl']:.3f}")

    first_metrics: dict[str, float] = {}
    if eval_rows and cfg.train.eval_at_start and step == 0:
        first_metrics = evaluate()
        log_eval(first_metrics)
        ray.train.report({"step": 0, **first_metrics})

    progress = ProgressPrinter(total_steps, start_step=step, enabled=rank == 0)
    engine.train()
    stop_at = min(total_steps, cfg.run.stop_after_steps or total_steps)
    shard = ray.train.get_dataset_shard("train")
    fault = config.get("fault")
    step_loss, step_tokens, step_targets = 0.0, 0, 0
    train_tokens = 0
    while step < stop_at:
        epoch, skip = divmod(micro, micro_per_epoch)
        batches = shard.iter_batches(
            batch_size=mb * world,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=(cfg.train.seed + epoch) if cfg.data.shuffle_buffer else None,
        )
        for i, batch in enumerate(batches):
            if i < skip:  # mid-epoch resume: consume what the interrupted run already trained on
                continue
            if i >= micro_per_epoch:
                break
            rows = list(iter_rows(batch))
            step_tokens += sum(len(r["input_ids"]) for r in rows)  # the whole global batch: no collective
            b = collate(rows[rank * mb : (rank + 1) * mb], pad_id)
            step_targets += count_target_tokens(b["labels"])
            out = engine(**{k: v.to(device) for k, v in b.items()})
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.item() / gas
            micro += 1
            if micro % gas:
                continue
            step += 1
            loss_t = torch.tensor([step_loss], dtype=torch.float64, device=device)
            dist.all_reduce(loss_t)
            loss = float(loss_t) / world
            train_tokens += step_tokens
            lr = engine.get_lr()[0]
            tok_s = progress.update(step, loss=loss, lr=lr, tokens=step_tokens)
            if rank == 0 and (step % cfg.train.log_every == 0 or step == stop_at):
                append_jsonl(run_dir / "metrics.jsonl", {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tok_s})
            step_loss, step_tokens, step_targets = 0.0, 0, 0

            if fault and step == fault["step"] and rank == world - 1 and not os.path.exists(fault["marker"]):
                Path(fault["marker"]).write_text(f"killed rank {rank} at step {step}\n")
                os._exit(1)  # a hard crash, as when a node dies: no cleanup, no report

            metrics: dict[str, Any] = {"step": step, "loss": loss, "lr": lr}
            if eval_rows and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total_steps:
                m = evaluate()
                log_eval(m)
                metrics.update(m)
            at_end = step == stop_at
            if at_end or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0):
                if at_end and step == total_steps and eval_rows:
                    final = evaluate()
                    log_eval(final)
                    metrics.update(final)
                save_and_report(metrics)
            elif "eval_loss" in metrics:
                ray.train.report(metrics)
            if step >= stop_at:
                break

    if step < total_steps:
        return  # stopped early on purpose; the checkpoint above is where a rerun resumes

    _export(engine, cfg, config, tokenizer, rank, run_dir, device, first_metrics, progress)


def _materialize(name: str, n: int) -> list[dict[str, Any]]:
    import ray.train

    if not n:
        return []
    rows: list[dict[str, Any]] = []
    for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=256, batch_format="numpy"):
        rows.extend(iter_rows(batch))
    return rows


def _eval_batches(rows: list[dict[str, Any]], rank: int, world: int, mb: int, pad_id: int):
    """This rank's eval batches. Every rank yields the same number of batches (dummy ones with weight 0
    where it has run out) because under ZeRO-3 each forward is a collective."""
    mine = rows[rank::world]
    n_batches = math.ceil(math.ceil(len(rows) / world) / mb)
    for i in range(n_batches):
        chunk_rows = mine[i * mb : (i + 1) * mb]
        if chunk_rows:
            yield collate(chunk_rows, pad_id)
        else:
            yield {**collate(rows[:1], pad_id), "weight": 0}


def _export(engine, cfg: FinetuneConfig, config, tokenizer, rank, run_dir: Path, device, first_metrics, progress) -> None:
    """Gather the full weights on rank 0 and write + verify the artifact (all ranks must call this)."""
    import ray.train

    from raydist.components.export import export_artifact, logits_of, probe_batch

    base_config = load_model_config(cfg.model)
    probe = probe_batch(base_config.vocab_size)
    engine.eval()
    reference = logits_of(engine.module, probe)  # a collective forward under ZeRO-3
    if cfg.deepspeed.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # all ranks; full dict on rank 0 only
    else:
        state = {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()} if rank == 0 else None
    metrics: dict[str, Any] = {}
    if rank == 0:
        history = read_history(run_dir / "metrics.jsonl")
        evals = [h for h in history if "eval_loss" in h]
        trains = [h for h in history if "tokens_per_s" in h]
        if first_metrics or evals:
            start = first_metrics or evals[0]
            metrics.update(eval_loss_before=start["eval_loss"], eval_ppl_before=start["eval_ppl"])
        if evals:
            metrics.update(eval_loss=evals[-1]["eval_loss"], eval_ppl=evals[-1]["eval_ppl"])
        if trains:
            metrics.update(train_loss=trains[-1]["loss"], tokens_per_s=progress.mean_tokens_per_s() or trains[-1]["tokens_per_s"])
        metrics["steps"] = config["total_steps"]
        src = resolve_model_source(cfg.model)
        info = export_artifact(
            state,
            base_config=base_config,
            tokenizer=tokenizer,
            lora=cfg.lora if cfg.lora.enabled else None,
            out_dir=run_dir / ARTIFACT_DIR,
            reference_logits=reference,
            probe=probe,
            adapter_base_path="" if src.kind == "tiny" else src.describe(),
            atol=1e-3 if next(iter(state.values())).dtype == torch.float32 else 5e-2,
        )
        metrics["export_max_abs_logit_diff"] = info["export_max_abs_logit_diff"]
        write_manifest(
            run_dir / ARTIFACT_DIR,
            stage="finetune",
            config=config["cfg"],
            parent={**config["parent"], "hash": hash_model_source(src, cfg.model)},
            metrics=metrics,
            num_parameters=info["num_parameters"],
            extra={"lora": {"adapter_dir": "adapter", "adapter_nonzero": info["adapter_nonzero"]}} if cfg.lora.enabled else None,
        )
        console(f"[raydist] exported {run_dir / ARTIFACT_DIR} ({info['num_parameters']:,} parameters)")
    ray.train.report({"step": config["total_steps"], "exported": 1, **metrics})
