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

from pathlib import Path
from typing import Any

import torch

from raydist.config.finetune import FinetuneConfig
from raydist.core.artifact import write_manifest
from raydist.core.models import (
    hash_model_source,
    load_model,
    load_model_config,
    load_tokenizer,
    resolve_model_source,
)
from raydist.core.preflight import preflight_finetune
from raydist.core.progress import console
from raydist.core.runs import (
    finish_run,
    open_run_dir,
    plan_training,
    tokenize_once,
    train_on_ray,
    with_absolute_paths,
)
from raydist.train.export import export_artifact, logits_of, peft_lora_config, probe_batch
from raydist.train.plumbing import apply_dropout, seed_everything
from raydist.train.worker import TrainingSession

ARTIFACT_DIR = "artifact"


# ----------------------------------------------------------------------------------------------- driver


def run_finetune(cfg: FinetuneConfig, *, verbose: bool = True) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with Ray Train + DeepSpeed; return the artifact directory.

    If ``run.stop_after_steps`` is set the run checkpoints and stops there; rerunning the same config
    resumes it. Returns the run directory in that case (no artifact yet).

    Raises:
        PreflightError / ConfigError / RunDirError: before any worker starts.
    """
    report, tokenizer = preflight_finetune(cfg)
    cfg = with_absolute_paths(cfg)
    # what the cluster cannot place is refused before anything is written
    run_dir, resuming = open_run_dir(cfg, ARTIFACT_DIR, prepare=lambda: plan_training(cfg))
    say = print if verbose else (lambda *a, **k: None)
    say(f"[raydist] run dir: {run_dir.location} ({'resuming' if resuming else 'new run'})")
    counts = tokenize_once(run_dir, cfg.data, cfg.model, cfg.train.seed, tokenizer, say)
    parent = {"kind": report.model_kind, "path": resolve_model_source(cfg.model).describe()}
    method = "LoRA" if cfg.lora.enabled else "full"
    train_on_ray(train_loop_per_worker, cfg, run_dir, counts, {"parent": parent}, say, f"fine-tuning ({method})")
    return finish_run(run_dir, ARTIFACT_DIR, cfg.run.stop_after_steps, f"{run_dir.name} ({method})", say)


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
    finished = session.run(loss_fn=lambda b, _step_targets: engine(**b).loss)
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
            extra={"lora": {"adapter_dir": "adapter", "adapter_nonzero": info["adapter_nonzero"]}}
            if cfg.lora.enabled
            else None,
        )
        session.publish(ARTIFACT_DIR)
        console(f"[raydist] exported {session.storage.at(ARTIFACT_DIR)} ({info['num_parameters']:,} parameters)")
    ray.train.report({"step": session.total_steps, "exported": 1, **metrics})
