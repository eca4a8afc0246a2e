"""The compression sweep (``target: compress``): the base model measured once and shipped to every trial through
the object store, one Ray Tune trial per prune x quantize candidate, perplexity on growing budgets (ASHA rungs),
the Pareto front and the winner exported with its lineage.

~510 lines: the compression sweep read top to bottom (inputs, trial, driver, winner export).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import ray
import ray.tune
import torch
from ray import tune
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from raydist.compress.candidate import apply_candidate, token_rows
from raydist.compress.pareto import choose_winner, pareto_front, plot_pareto
from raydist.compress.quant.format import load_compressed, save_compressed
from raydist.compress.structured import collect_importance
from raydist.config.sweep import EvalSettings, RecoverySettings, SweepConfig, normalize_candidate
from raydist.core import storage
from raydist.core.artifact import read_manifest, write_json_atomic, write_manifest
from raydist.core.data import detect_format, load_records, text_source_ids, tokenize_source
from raydist.core.evaluation import IncrementalPerplexity, model_size, perplexity_on, task_metrics
from raydist.core.models import hash_model_source, load_model, load_tokenizer, resolve_model_source
from raydist.core.preflight import PreflightError
from raydist.core.resources import assigned_accelerators, unit_device
from raydist.core.runs import StageFailed
from raydist.core.storage import Mirror
from raydist.sweep.speed import generation_speed
from raydist.sweep.tuning import (
    ARTIFACT_DIR,
    PLOT,
    REPORT,
    NoCandidateMet,
    copy_for_export,
    make_searcher,
    make_tuner,
    policy_aware_asha,
    publish_export,
)


def _shared_inputs(cfg: SweepConfig, tokenizer, base, candidates, say) -> dict[str, Any]:
    """Tensors every trial needs, prepared once (they travel through the object store)."""

    ev = cfg.eval
    eval_ids = text_source_ids(ev.data, tokenizer)
    need = ev.budgets[-1]
    if len(eval_ids) < need:
        raise PreflightError(f"eval.data has {len(eval_ids)} tokens, fewer than the last budget ({need})")
    windows = token_rows(eval_ids[:need], ev.window)
    calib_ids = text_source_ids(ev.calibration, tokenizer)
    calibration = token_rows(calib_ids, ev.calibration_seq_len, ev.calibration_sequences)
    shared: dict[str, Any] = {"windows": windows, "calibration": calibration}
    if ev.task is not None:
        records = load_records(ev.task)
        fmt = detect_format(records, ev.task)
        if fmt == "text":
            raise PreflightError(
                f"eval.task {ev.task.path or ev.task.builtin} is plain text; the task metric needs "
                "instruction ('instruction' + 'output') or chat ('messages') records"
            )
        examples = tokenize_source(records, fmt, ev.task, tokenizer, ev.task_seq_len, packing=False)
        shared["task"] = examples[: ev.task_max_examples]
        shared["pad_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if any(c["recovery"] in ("distill", "qat") for c in candidates):
        rc = cfg.recovery
        shared["recovery_ids"] = token_rows(text_source_ids(rc.data, tokenizer), rc.seq_len)
    if any(c["structured"] > 0 for c in candidates):
        t = time.time()
        shared["importance"] = collect_importance(base, [calibration])
        say(f"[raydist] structured-pruning importance measured once on the base model ({time.time() - t:.0f}s)")
    return shared


def _model_payload(model) -> dict[str, Any]:
    """The base model as numpy arrays + config: what the object store holds (read zero-copy by trials)."""
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    # Non-persistent buffers (rotary inv_freq, ...) are not in the state dict but are computed at init,
    # which the trial skips (it builds on the meta device): ship them too.
    persistent = set(state)
    buffers = {k: v.detach().cpu().numpy() for k, v in model.named_buffers() if k not in persistent}
    return {"config": model.config.to_dict(), "state": state, "buffers": buffers}


def model_from_payload(payload: dict[str, Any], device: str = "cpu"):
    """A private, writable copy of the shared base model (no random init: built on the meta device)."""

    config = AutoConfig.for_model(**payload["config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = {k: torch.from_numpy(v.copy()) for k, v in payload["state"].items()}
    model.load_state_dict(state, assign=True, strict=False)
    for name, value in payload.get("buffers", {}).items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = torch.from_numpy(value.copy())
    model.tie_weights()
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise RuntimeError(f"base model payload lacks {missing[:4]}")
    model.to(device)
    if device == "cuda":
        model.to(torch.bfloat16)
    return model.eval()


def measure(model, tokenizer, cfg_eval, artifact_dir: Optional[Path]) -> dict[str, Any]:
    """Generation speed through the serving engine (what ``raydist serve`` runs, with the model's real kernels
    on its device) and, given an artifact, its sizes."""

    out = model_size(model, artifact_dir) if artifact_dir is not None else {}
    for b in cfg_eval.latency_batch_sizes:
        sp = generation_speed(
            model,
            batch_size=b,
            prompt_len=cfg_eval.latency_prompt_tokens,
            new_tokens=cfg_eval.latency_new_tokens,
            repeats=cfg_eval.latency_repeats,
            tokenizer=tokenizer,
            engine="serve",
        )
        out[f"tokens_per_s_b{b}"] = sp["tokens_per_s"]
    out["tokens_per_s"] = out[f"tokens_per_s_b{cfg_eval.latency_batch_sizes[0]}"]
    return out


def compress_trial(config: dict[str, Any], payload=None, shared=None) -> None:
    """One Tune trial: compress a copy of the base model as ``config["candidate"]`` says, save, measure."""

    started = time.time()
    torch.set_num_threads(max(1, int(config["threads"])))
    candidate = normalize_candidate(config["candidate"])
    fault = config.get("fault")
    if fault and all(candidate.get(k) == v for k, v in fault.items()):
        raise RuntimeError(f"injected failure (RAYDIST_SWEEP_FAIL={json.dumps(fault)}) for candidate {candidate}")
    ev = EvalSettings.model_validate(config["eval"])
    rc = RecoverySettings.model_validate(config["recovery"])
    device = unit_device(config["device"], "sweep trial").type
    torch.manual_seed(0)
    model = model_from_payload(payload, device)
    teacher = model_from_payload(payload, device) if candidate["recovery"] in ("distill", "qat") else None
    report = apply_candidate(
        model,
        candidate,
        calibration=shared["calibration"].to(device),
        importance=shared.get("importance"),
        teacher=teacher,
        recovery_ids=shared.get("recovery_ids"),
        recovery={"steps": rc.steps, "batch_size": rc.batch_size, "lr": rc.lr, "temperature": rc.temperature},
        device=device,
    )
    del teacher
    # the trial's directory may be on remote storage: work in a local mirror, push the artifact when saved
    trial = Mirror(storage.join(config["trials_dir"], ray.tune.get_context().get_trial_id()), role="trial")
    trial_dir = trial.local
    art = trial_dir / ARTIFACT_DIR
    if art.exists():  # a retried trial starts over
        shutil.rmtree(art)
    trial_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(config["tokenizer_dir"]))
    save_compressed(
        model,
        tokenizer,
        art,
        report.get("quantization"),
        stage="sweep-trial",
        config={"candidate": candidate},
        parent=config["parent"],
        metrics={},
    )
    (trial_dir / "compression.json").write_text(json.dumps(report, indent=2, default=str))
    trial.push("compression.json")
    trial.push(ARTIFACT_DIR)
    # Measure what was exported, reloaded: saving folds SmoothQuant into the layers in front, and with dynamic
    # int8 activations that float rounding flips activation codes, enough to move the perplexity of the same
    # model beyond the winner check's tolerance; the artifact's own figure is the one that holds.
    del model
    model = load_measured(art, device)

    metrics = model_size(model, art)
    metrics.update(
        candidate=json.dumps(candidate, sort_keys=True),
        artifact=str(trial.at(ARTIFACT_DIR)),
        compress_seconds=sum(report["seconds"].values()),
        device=device,
        started_at=started,
        **assigned_accelerators(),
    )
    base = config.get("base") or {}
    same_as_base = bool(base.get("ppl_by_budget")) and not any(
        report.get(step) for step in ("structured", "sparsity", "recovery", "quantization")
    )
    ppl_at = IncrementalPerplexity(model, shared["windows"].to(device))
    for budget in ev.budgets:  # each budget is one ASHA rung
        final = budget == ev.budgets[-1]
        if same_as_base:
            # the candidate that changes nothing is the base model, which the driver measured the same way
            # (and its artifact, saved above, holds the same weights)
            ppl = base["ppl_by_budget"][str(budget)]
            if final:
                metrics.update(
                    {k: v for k, v in base.items() if k.startswith(("tokens_per_s", "task_"))}, measured_as="base"
                )
        else:
            ppl = ppl_at(budget)
            if final:
                # Generation speed (the slowest measurement) only for candidates that reach the full eval:
                # one ASHA stopped on perplexity can be neither on the Pareto front nor the winner.
                metrics.update(measure(model, tokenizer, ev, None), **_task(model, shared))
        ray.tune.report(
            {
                "tokens_per_s": None,
                **metrics,
                "ppl": ppl if math.isfinite(ppl) else 1e30,
                "eval_tokens": budget,
                "final": final,
                "reported_at": time.time(),
            }
        )


def _task(model, shared: dict[str, Any]) -> dict[str, Any]:
    """The optional task metric (``eval.task``) on the full-eval rung; {} when none is configured."""

    if not shared.get("task"):
        return {}
    return task_metrics(model, shared["task"], pad_id=shared["pad_id"])


def compress_sweep(cfg: SweepConfig, run_dir: Mirror, resuming: bool, candidates, plan, say):

    tokenizer = load_tokenizer(cfg.model)
    t0 = time.time()
    base = load_model(cfg.model).eval()
    src = resolve_model_source(cfg.model)
    parent = {"kind": src.kind, "path": src.describe(), "hash": hash_model_source(src, cfg.model)}
    say(
        f"[raydist] base model loaded once ({sum(p.numel() for p in base.parameters()):,} parameters, "
        f"{time.time() - t0:.0f}s); {len(candidates)} distinct candidate(s) in the search space"
    )
    shared = _shared_inputs(cfg, tokenizer, base, candidates, say)
    tok_dir = run_dir.local / "tokenizer"
    if not run_dir.exists("tokenizer/tokenizer_config.json"):
        tokenizer.save_pretrained(tok_dir)
        run_dir.push("tokenizer", last="tokenizer_config.json")
    payload = _model_payload(base)  # what the trials share (through the object store)
    del base

    threads = max(1, int(plan.num_cpus))
    # The base measurement and the winner's re-measurement run as Ray tasks with a trial's resources, so they
    # compute on the device a trial gets (the driver may be a CPU-only head) and their speeds are comparable.
    on_trial_resources = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_retries=0)
    base_file = run_dir.pull("base_metrics.json")
    if base_file.is_file():
        base_m = json.loads(base_file.read_text())
    else:  # the reference every candidate is compared with, measured the same way as a trial
        say("[raydist] measuring the base model (perplexity, bytes, generation speed)")
        try:
            base_m = ray.get(
                on_trial_resources(measure_base).remote(
                    payload,
                    shared,
                    cfg.eval.model_dump(mode="json"),
                    cfg.resources.device,
                    threads,
                    str(run_dir.at("tokenizer")),
                    parent,
                )
            )
        except ray.exceptions.RayTaskError as e:  # e.g. GPUs assigned that torch cannot see
            cause = str(e.cause) if getattr(e, "cause", None) is not None else str(e).strip().splitlines()[-1]
            raise StageFailed(f"measuring the base model on a trial's resources failed: {cause}") from None
        write_json_atomic(base_file, base_m)
        run_dir.push("base_metrics.json")
    say(
        f"[raydist] base ({base_m.get('device', '?')}): ppl {base_m['ppl']:.4g}, "
        f"{base_m['disk_bytes'] / 2**20:.1f} MiB, {base_m['tokens_per_s']:.1f} tok/s "
        f"(batch {cfg.eval.latency_batch_sizes[0]})"
    )

    param_space, search_alg, num_samples, n_trials = make_searcher(cfg, candidates)
    param_space.update(
        {
            "eval": cfg.eval.model_dump(mode="json"),
            "recovery": cfg.recovery.model_dump(mode="json"),
            "device": cfg.resources.device,
            "threads": threads,
            "trials_dir": str(run_dir.at("trials")),
            "tokenizer_dir": str(run_dir.at("tokenizer")),
            "parent": parent,
            "base": base_m,
            # Fault drill for tests and chaos runs: candidates matching these key/values raise in their trial.
            "fault": json.loads(os.environ["RAYDIST_SWEEP_FAIL"]) if os.environ.get("RAYDIST_SWEEP_FAIL") else None,
        }
    )
    trainable = tune.with_resources(
        tune.with_parameters(compress_trial, payload=payload, shared=shared),
        {"cpu": plan.num_cpus, "gpu": plan.num_gpus},
    )
    scheduler = None
    if cfg.search.asha and len(cfg.eval.budgets) > 1:
        limit = 1 + cfg.policy.max_quality_loss_pct / 100
        by_budget = base_m.get("ppl_by_budget") or {}
        protect = [by_budget.get(str(k), base_m["ppl"]) * limit for k in cfg.eval.budgets]

        scheduler = policy_aware_asha(protect)
    say(
        f"[raydist] sweeping {n_trials} candidate(s) ({cfg.search.algorithm}"
        f"{', ASHA' if scheduler else ''}), {cfg.search.max_concurrent} at a time, each {plan.describe()[4:]}"
    )
    t0 = time.time()
    tuner = make_tuner(
        cfg,
        run_dir,
        trainable,
        param_space,
        resuming,
        metric=None,
        mode=None,
        scheduler=scheduler,
        search_alg=search_alg,
        num_samples=num_samples,
        total=n_trials,
    )
    grid = tuner.fit()
    wall = time.time() - t0
    rows = _rows(grid, base_m["ppl"], cfg.eval.budgets[-1])
    remeasure = on_trial_resources(remeasure_winner)
    return _finish(cfg, run_dir, rows, base_m, wall, parent, shared, remeasure, say)


def measure_base(payload, shared, eval_json, device_setting: str, threads: int, tok_dir: str, parent) -> dict[str, Any]:
    """The base model measured as a trial measures a candidate (runs as a Ray task with a trial's resources)."""

    ev = EvalSettings.model_validate(eval_json)
    device = unit_device(device_setting, "sweep base measurement").type
    torch.set_num_threads(threads)
    model = model_from_payload(payload, device)

    with tempfile.TemporaryDirectory() as tmp:  # only to measure the bytes a saved base model takes
        art = Path(tmp) / "base"
        tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(tok_dir))
        save_compressed(model, tokenizer, art, None, stage="sweep-base", parent=parent, metrics={})
        out = measure(model, tokenizer, ev, art)
    ppl = IncrementalPerplexity(model, shared["windows"].to(device))
    # the base at every ASHA rung: a candidate within the policy there is never stopped early
    out["ppl_by_budget"] = {str(k): ppl(k) for k in ev.budgets}
    out["ppl"] = ppl()
    out.update(_task(model, shared), device=device, **assigned_accelerators())
    return out


def load_measured(artifact, device: str):
    """An artifact loaded as the sweep measures models: in the trials' dtype (bfloat16 on CUDA, as
    :func:`model_from_payload`), with the device's kernels."""
    return load_compressed(artifact, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)


def remeasure_winner(artifact: str, windows, device_setting: str) -> float:
    """Perplexity of an exported artifact after a reload (a Ray task with a trial's resources): the trial
    measured the same files, so anything but the same figure means the export changed them."""

    device = unit_device(device_setting, "sweep winner check").type
    return perplexity_on(load_measured(artifact, device), windows.to(device))


def _rows(grid, base_ppl: float, full_budget: int) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        cand = m.get("candidate")
        cand = json.loads(cand) if isinstance(cand, str) else (r.config or {}).get("candidate")
        row: dict[str, Any] = {"trial_id": m.get("trial_id") or (r.path and Path(r.path).name), "candidate": cand}
        if r.error is not None:
            row.update(
                status="failed", error=f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:500]}"
            )
        elif m.get("eval_tokens") == full_budget:
            row["status"] = "completed"
        else:
            row["status"] = "stopped_early" if m else "not_run"
        for k in (
            "ppl",
            "eval_tokens",
            "disk_bytes",
            "disk_weight_bytes",
            "parameters",
            "nonzero_parameters",
            "sparsity",
            "tokens_per_s",
            "artifact",
            "compress_seconds",
            "task_answer_ppl",
            "task_token_accuracy",
            "measured_as",
            "device",
            "node_id",
            "gpu_ids",
            "cuda_visible_devices",
            "started_at",
            "reported_at",
        ):
            if m.get(k) is not None:
                row[k] = m[k]
        row.update({k: v for k, v in m.items() if k.startswith("tokens_per_s_b")})
        if "ppl" in row:
            row["quality_loss_pct"] = 100 * (row["ppl"] / base_ppl - 1)
        rows.append(row)
    return rows


def _finish(cfg, run_dir: Mirror, rows, base_m, wall, parent, shared, remeasure, say):

    done = [r for r in rows if r["status"] == "completed"]
    front = [done[i]["trial_id"] for i in pareto_front(done)]
    wi, reason = choose_winner(
        done, base_ppl=base_m["ppl"], max_quality_loss_pct=cfg.policy.max_quality_loss_pct, prefer=cfg.policy.prefer
    )
    for r in rows:
        r["pareto"] = r["trial_id"] in front
        if r.get("tokens_per_s") and base_m.get("tokens_per_s"):
            r["speedup"] = r["tokens_per_s"] / base_m["tokens_per_s"]
        if r.get("disk_bytes"):
            r["size_ratio"] = r["disk_bytes"] / base_m["disk_bytes"]
    winner = done[wi] if wi is not None else None
    plot = plot_pareto(done, [done.index(r) for r in done if r["pareto"]], run_dir.local / PLOT, base=base_m, winner=wi)
    run_dir.push(PLOT)
    report = {
        "stage": "sweep",
        "target": "compress",
        "device": base_m.get("device"),
        "wall_s": wall,
        "base": base_m,
        "policy": cfg.policy.model_dump(),
        "winner": winner,
        "winner_reason": reason,
        "pareto_front": front,
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped_early", "failed", "not_run")},
        "trials": sorted(rows, key=lambda r: (r["status"] != "completed", r.get("ppl", math.inf))),
        "plot": str(run_dir.at(PLOT)) if plot else None,
    }
    write_json_atomic(run_dir.local / REPORT, report)
    run_dir.push(REPORT)
    failed = [r for r in rows if r["status"] == "failed"]
    say(
        f"[raydist] sweep: {report['counts']['completed']} completed, {report['counts']['stopped_early']} stopped "
        f"early, {len(failed)} failed in {wall:.0f}s; Pareto front: {len(front)}; report {run_dir.at(REPORT)}"
    )
    for r in failed:
        say(f"[raydist]   failed: {json.dumps(r['candidate'], sort_keys=True)}: {r['error']}")
    if winner is None:
        _prune_artifacts(cfg, rows, None)
        raise NoCandidateMet(reason + f" (report: {run_dir.at(REPORT)})")

    # Export: the winner's trial artifact, re-loaded and re-measured before it is moved into place.
    tmp = copy_for_export(run_dir, winner["artifact"])
    ppl = ray.get(remeasure.remote(str(winner["artifact"]), shared["windows"], cfg.resources.device))
    if not math.isclose(ppl, winner["ppl"], rel_tol=1e-3):
        raise RuntimeError(f"the exported winner measures ppl {ppl:.6g} after reload, the trial {winner['ppl']:.6g}")
    trial_manifest = read_manifest(tmp)
    write_manifest(
        tmp,
        stage="sweep",
        config=cfg.model_dump(mode="json"),
        parent=parent,
        metrics={
            **{
                k: winner[k]
                for k in (
                    "ppl",
                    "quality_loss_pct",
                    "disk_bytes",
                    "tokens_per_s",
                    "parameters",
                    "nonzero_parameters",
                    "sparsity",
                    "task_answer_ppl",
                    "task_token_accuracy",
                )
                if k in winner
            },
            "reloaded_ppl": ppl,
            "base_ppl": base_m["ppl"],
            "speedup": winner.get("speedup"),
            "size_ratio": winner.get("size_ratio"),
        },
        num_parameters=winner.get("parameters", 0),
        extra={
            "candidate": winner["candidate"],
            "winner_reason": reason,
            "sweep_report": str(run_dir.at(REPORT)),
            **{k: v for k, v in trial_manifest.items() if k in ("quantization", "compression")},
        },
    )
    out = publish_export(run_dir, tmp)
    _prune_artifacts(cfg, rows, winner)
    say(
        f"[raydist] winner ({reason}): {json.dumps(winner['candidate'], sort_keys=True)}: ppl {ppl:.4g} "
        f"({winner['quality_loss_pct']:+.1f} %), {winner['disk_bytes'] / 2**20:.1f} MiB "
        f"(x{winner.get('size_ratio', float('nan')):.2f}), {winner['tokens_per_s']:.1f} tok/s "
        f"(x{winner.get('speedup', float('nan')):.2f})"
    )
    say(f"[raydist] artifact: {out}")
    return out


def _prune_artifacts(cfg: SweepConfig, rows, winner) -> None:
    """Trial artifacts are full model copies: keep those ``keep_artifacts`` asks for (the winner is exported)."""
    if cfg.keep_artifacts == "all":
        return
    for r in rows:
        keep = r.get("pareto") if cfg.keep_artifacts == "pareto" else False
        if not keep and r.get("artifact") and storage.exists(r["artifact"]):
            storage.delete(r["artifact"])
            r["artifact_removed"] = True


# ------------------------------------------------------------------------------------ fine-tuning sweep
