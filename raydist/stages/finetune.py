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
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch

from raydist.components.artifact import write_manifest
from raydist.components.data import build_datasets
from raydist.components.export import export_artifact, logits_of, peft_lora_config, probe_batch
from raydist.components.models import hash_model_source, load_model, load_model_config, load_tokenizer, resolve_model_source
from raydist.components.preflight import PreflightError, preflight_finetune
from raydist.components.progress import console, plot_loss_curve, read_history
from raydist.components.training import apply_dropout, seed_everything
from raydist.config.finetune import FinetuneConfig
from raydist.stages.common import (
    data_fingerprint,
    fit_or_explain,
    init_ray,
    open_run_dir,
    resolve_use_gpu,
    with_absolute_paths,
    write_examples_parquet,
)
from raydist.stages.worker import TrainingSession

ARTIFACT_DIR = "artifact"


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
    fit_or_explain(trainer, run_dir, cfg.run.max_failures)

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
    cfg = FinetuneConfig.model_validate(config["cfg"])
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    session = TrainingSession(config, cfg, pad_id=tokenizer.pad_token_id)

    model = load_model(cfg.model, seed=cfg.train.seed)
    if cfg.train.dropout is not None:
        apply_dropout(model, cfg.train.dropout)
    if cfg.lora.enabled:
        from peft import get_peft_model

        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, peft_lora_config(cfg.lora))
    engine = session.build_engine(model)
    session.restore()

    # The model's own loss: mean next-token cross-entropy over this micro-batch's target tokens.
    finished = session.run(loss_fn=lambda b: engine(**b).loss)
    if finished:
        _export(session, cfg, tokenizer)


def _export(session: TrainingSession, cfg: FinetuneConfig, tokenizer) -> None:
    """Gather the full weights on rank 0 and write + verify the artifact (all ranks must call this)."""
    import ray.train

    base_config = load_model_config(cfg.model)
    probe = probe_batch(base_config.vocab_size)
    session.engine.eval()
    reference = logits_of(session.engine.module, probe)  # a collective forward under ZeRO-3
    state = session.gather_state()
    metrics: dict[str, Any] = {}
    if session.rank == 0:
        run_dir = session.run_dir
        metrics = session.summary_metrics()
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
            config=session.config["cfg"],
            parent={**session.config["parent"], "hash": hash_model_source(src, cfg.model)},
            metrics=metrics,
            num_parameters=info["num_parameters"],
            extra={"lora": {"adapter_dir": "adapter", "adapter_nonzero": info["adapter_nonzero"]}} if cfg.lora.enabled else None,
        )
        console(f"[raydist] exported {run_dir / ARTIFACT_DIR} ({info['num_parameters']:,} parameters)")
    ray.train.report({"step": session.total_steps, "exported": 1, **metrics})
