"""The sweep stage: `raydist sweep`, Ray Tune over pruning x quantization (or fine-tuning hyperparameters).

Driver (``run_sweep``), read top to bottom:
1. check the config against the model before Ray starts (unknown schemes and group sizes, structured
   requests the model cannot meet), then what the cluster can place (``resources`` per trial), and open /
   resume the run directory;
2. load the base model **once**, tokenize the eval / calibration / recovery text once, measure the base
   model (perplexity, bytes, generation tokens/s) and, when a candidate needs it, the structured-pruning
   importance — all of it goes to the Ray object store once (``tune.with_parameters``), so no trial reads
   the model from disk;
3. Ray Tune runs one trial per candidate (grid, a seeded random subset, or multi-objective Optuna), in
   parallel within the resources (trials reuse their worker processes); a trial compresses its copy
   (``components.compression``), saves the artifact, measures its bytes, then perplexity on growing token
   budgets (each eval window scored once) — each budget is one report, so ASHA (``policy_aware_asha``:
   never stopping a candidate that still meets the winner policy) stops clearly worse candidates early; a
   candidate reaching the full eval also gets generation tokens/s on real kernels and the optional task
   metric. The candidate that changes nothing reuses the base measurement. A failed trial is recorded with
   its error and the sweep goes on; an interrupted sweep resumes (``Tuner.restore``);
4. the Pareto front over (perplexity, bytes, tokens/s) of the completed candidates, the winner by the
   policy, ``sweep_report.json``, ``pareto.png``, and the winner exported (re-loaded and re-measured) as
   ``artifact/`` with its lineage.

``target: finetune`` sweeps fine-tuning hyperparameters instead: each trial is a whole ``run_finetune``
(Ray Train + DeepSpeed inside the Tune trial) and the winner is the lowest eval perplexity.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from raydist.core import storage
from raydist.core.artifact import read_manifest, write_json_atomic
from raydist.core.progress import console
from raydist.core.storage import Mirror
from raydist.config.sweep import KNOBS, SweepConfig

ARTIFACT_DIR = "artifact"
REPORT = "sweep_report.json"
PLOT = "pareto.png"


class NoCandidateMet(RuntimeError):
    """The sweep finished but no candidate met the winner policy (the report is written)."""


# ----------------------------------------------------------------------------------------------- driver


def run_sweep(cfg: SweepConfig, *, verbose: bool = True) -> Path:
    """Run (or resume) the sweep; return the exported winner's directory.

    Raises:
        PreflightError / ConfigError / RunDirError: before any trial starts.
        NoCandidateMet: after the sweep, when no candidate met the policy (``sweep_report.json`` says why).
    """
    from raydist.core.runs import open_run_dir, with_absolute_paths

    say = print if verbose else (lambda *a, **k: None)
    cfg = with_absolute_paths(cfg)
    if cfg.target == "finetune":
        cfg = cfg.model_copy(update={"finetune": with_absolute_paths(cfg.finetune)})
        run_dir, resuming = open_run_dir(cfg, ARTIFACT_DIR)
        say(f"[raydist] run dir: {run_dir.location} ({'resuming' if resuming else 'new sweep'})")
        return _finetune_sweep(cfg, run_dir, resuming, say)
    candidates = preflight_sweep(cfg)
    from raydist.core.runs import init_ray
    from raydist.core.resources import plan_units

    plans = []

    def place() -> None:  # refused (PreflightError) before anything is written
        init_ray(cfg.search.max_concurrent * cfg.resources.num_cpus)
        plans.append(plan_units(cfg.resources, cfg.search.max_concurrent, "sweep trial"))

    run_dir, resuming = open_run_dir(cfg, ARTIFACT_DIR, prepare=place)
    plan = plans[0]
    say(f"[raydist] run dir: {run_dir.location} ({'resuming' if resuming else 'new sweep'})")
    return _compress_sweep(cfg, run_dir, resuming, candidates, plan, say)


def preflight_sweep(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Everything that can be checked before Ray starts; returns the distinct candidates.

    The device is not decided here: each trial computes where Ray placed it (``resources``).

    Raises:
        PreflightError: unknown model, an unsupported scheme / group size, a structured request the model
            cannot meet.
    """
    from raydist.compress.quant import quantization
    from raydist.compress.candidate import CandidateError, structured_plan
    from raydist.core.models import load_model_config, resolve_model_source
    from raydist.core.preflight import PreflightError

    resolve_model_source(cfg.model)  # ModelSourceError names the problem
    config = load_model_config(cfg.model)
    problems = []
    for scheme in cfg.search_space.quantization:
        if scheme == "none":
            continue
        for g in cfg.search_space.group_size if scheme == "int4_weight_only" else [None]:
            try:
                quantization.check_scheme(scheme, g)
            except ValueError as e:
                problems.append(f"search_space.quantization {scheme!r}: {e}")
    for fraction in cfg.search_space.structured:
        for structure in cfg.search_space.structure:
            if fraction > 0:
                try:
                    structured_plan(config, fraction, structure)
                except CandidateError as e:
                    problems.append(f"search_space.structured {fraction} with structure {structure!r}: {e}")
    if problems:
        raise PreflightError("the search space has candidates this model cannot run:\n  " + "\n  ".join(problems))
    return cfg.search_space.candidates()


def _shared_inputs(cfg: SweepConfig, tokenizer, base, candidates, say) -> dict[str, Any]:
    """Tensors every trial needs, prepared once (they travel through the object store)."""
    from raydist.compress.candidate import token_rows
    from raydist.core.data import text_source_ids
    from raydist.core.preflight import PreflightError

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
        from raydist.core.data import detect_format, load_records, tokenize_source

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
        from raydist.compress.structured import collect_importance

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
    from transformers import AutoConfig, AutoModelForCausalLM

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
    from raydist.core.evaluation import model_size
    from raydist.sweep.speed import generation_speed

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
    import ray.tune

    from raydist.compress.candidate import apply_candidate
    from raydist.core.evaluation import IncrementalPerplexity
    from raydist.compress.quant.quantization import save_compressed
    from raydist.config.sweep import EvalSettings, RecoverySettings, normalize_candidate
    from raydist.core.resources import assigned_accelerators, unit_device

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
    from transformers import AutoTokenizer

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
    from raydist.core.evaluation import model_size

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
    from raydist.core.evaluation import task_metrics

    if not shared.get("task"):
        return {}
    return task_metrics(model, shared["task"], pad_id=shared["pad_id"])


def policy_aware_asha(protect: list[float]):
    """ASHA over the eval budgets (one rung each) that never stops a candidate whose perplexity at a rung is
    at most ``protect[rung]`` (the base model's perplexity at that budget times the policy's allowance).

    With few trials plain ASHA's cut (the rung's median) can drop a candidate 0.7 % off the base only
    because a base-like one reported first, and a candidate the policy would pick never completes.
    """
    from ray.tune.schedulers import ASHAScheduler

    class PolicyAwareASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            rung = int(result.get("training_iteration", 0)) - 1
            if action == self.STOP and 0 <= rung < len(protect) - 1 and result.get("ppl", math.inf) <= protect[rung]:
                self._num_stopped -= 1
                return self.CONTINUE
            return action

    return PolicyAwareASHA(
        time_attr="training_iteration", metric="ppl", mode="min", max_t=len(protect), grace_period=1, reduction_factor=2
    )


def _progress_callback(total: int, target: str):
    """A Tune callback printing one line per finished / stopped / failed trial (Tune's tables are off)."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.done = 0

        def _line(self, trial, what: str) -> None:
            self.done += 1
            r = trial.last_result or {}
            if target == "finetune":
                what_ = json.dumps(trial.config.get("overrides", {}), sort_keys=True)
                m = f"eval ppl {r['eval_ppl']:.4g}" if "eval_ppl" in r else ""
            else:
                what_ = r.get("candidate") or json.dumps(trial.config.get("candidate", {}), sort_keys=True)
                m = (
                    (
                        f"ppl {r['ppl']:.4g} @ {r.get('eval_tokens')} tok, {r.get('disk_bytes', 0) / 2**20:.1f} MiB"
                        + (f", {r['tokens_per_s']:.1f} tok/s" if r.get("tokens_per_s") is not None else "")
                    )
                    if "ppl" in r
                    else ""
                )
            console(f"[raydist] trial {self.done}/{total} {what}: {what_} {m}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            self._line(trial, "stopped early (ASHA)" if r.get("final") is False else "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "FAILED")

    return Progress()


def _finetune_trials_that_fit(wanted: int, cpus_per_trial: float, say) -> int:
    """How many fine-tuning trials may run at once on this cluster's CPUs.

    A trial reserves its own CPU(s) from Tune and then asks for a Ray Train worker group apart; trials started
    beyond what the CPUs hold would each keep their own reservation and wait forever for their workers
    (a deadlock, seen with 2 trials of 1 + 2 CPUs on 4). ``RAYDIST_SKIP_PLACEMENT_CHECK=1`` (an autoscaling
    cluster whose nodes are not up yet) keeps ``wanted``.

    Raises:
        PreflightError: not even one trial fits.
    """
    import ray

    from raydist.core.preflight import PreflightError
    from raydist.core.resources import SKIP_CHECK_ENV

    if os.environ.get(SKIP_CHECK_ENV) == "1":
        return wanted
    cpus = ray.cluster_resources().get("CPU", 0.0)
    fit = int(cpus // cpus_per_trial) if cpus_per_trial > 0 else wanted
    if fit < 1:
        raise PreflightError(
            f"one fine-tuning trial needs {cpus_per_trial:g} CPUs (its driver and its Ray Train "
            f"workers); the cluster has {cpus:g}"
        )
    if fit < wanted:
        say(
            f"[raydist] search.max_concurrent={wanted}, but {cpus:g} CPUs hold {fit} trial(s) of "
            f"{cpus_per_trial:g} CPUs at once: running {fit} at a time"
        )
    return min(fit, wanted)


def _tuner(
    cfg: SweepConfig,
    run_dir: Mirror,
    trainable,
    param_space: dict[str, Any],
    resuming: bool,
    *,
    metric: Optional[str],
    mode: Optional[str],
    scheduler=None,
    search_alg=None,
    num_samples: int = 1,
    total: int = 1,
    max_concurrent: Optional[int] = None,
):
    from ray import tune

    fs, tune_path = storage.filesystem(run_dir.at("tune"))
    fs_arg = fs if run_dir.remote else None
    # Save the experiment state every 2 s (Tune's "auto" period can leave finished trials out of the state
    # a killed driver left behind, and a resumed sweep would then run them again).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if resuming and tune.Tuner.can_restore(f"{tune_path}/sweep", storage_filesystem=fs_arg):
        return tune.Tuner.restore(
            f"{tune_path}/sweep",
            trainable=trainable,
            resume_errored=False,
            restart_errored=False,
            param_space=param_space,
            storage_filesystem=fs_arg,
        )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            # trials reuse their worker process (no new interpreter + torch import
            # per candidate); each trial builds its own model from the payload
            reuse_actors=True,
            max_concurrent_trials=None if search_alg is not None else (max_concurrent or cfg.search.max_concurrent),
        ),
        run_config=tune.RunConfig(
            name="sweep",
            storage_path=tune_path,
            storage_filesystem=fs_arg,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            callbacks=[_progress_callback(total, cfg.target)],
        ),
    )


def _search(cfg: SweepConfig, candidates: list[dict[str, Any]]):
    """``(param_space, search_alg, num_samples, n_trials)`` for the configured algorithm."""
    import random

    from ray import tune

    s = cfg.search
    if s.algorithm == "grid":
        return {"candidate": tune.grid_search(candidates)}, None, 1, len(candidates)
    if s.algorithm == "random":  # a seeded subset of distinct candidates (no duplicate models)
        picked = random.Random(s.seed).sample(candidates, min(s.num_samples, len(candidates)))
        return {"candidate": tune.grid_search(picked)}, None, 1, len(picked)
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    sp = cfg.search_space
    space = {"candidate": {k: tune.choice(list(getattr(sp, k))) for k in KNOBS}}

    class _Search(OptunaSearch):
        # A candidate ASHA stopped has no speed (measured at the full eval only): Optuna records it as pruned.
        def on_trial_complete(self, trial_id, result=None, error=False):
            if result and any(result.get(m) is None for m in self.metric):
                result = None
            super().on_trial_complete(trial_id, result, error)

    searcher = _Search(metric=["ppl", "disk_bytes", "tokens_per_s"], mode=["min", "min", "max"], seed=s.seed)
    return space, ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent), s.num_samples, s.num_samples


def _compress_sweep(cfg: SweepConfig, run_dir: Mirror, resuming: bool, candidates, plan, say):
    import ray
    from ray import tune

    from raydist.core.models import hash_model_source, load_model, load_tokenizer, resolve_model_source
    from raydist.core.runs import StageFailed

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

    param_space, search_alg, num_samples, n_trials = _search(cfg, candidates)
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
    tuner = _tuner(
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
    from transformers import AutoTokenizer

    from raydist.core.evaluation import IncrementalPerplexity
    from raydist.compress.quant.quantization import save_compressed
    from raydist.config.sweep import EvalSettings
    from raydist.core.resources import assigned_accelerators, unit_device

    ev = EvalSettings.model_validate(eval_json)
    device = unit_device(device_setting, "sweep base measurement").type
    torch.set_num_threads(threads)
    model = model_from_payload(payload, device)
    import tempfile

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


def remeasure_winner(artifact: str, windows, device_setting: str) -> float:
    """Perplexity of an exported artifact after a reload (a Ray task with a trial's resources)."""
    from raydist.core.evaluation import perplexity_on
    from raydist.compress.quant.quantization import load_compressed
    from raydist.core.resources import unit_device

    device = unit_device(device_setting, "sweep winner check").type
    return perplexity_on(load_compressed(artifact, device=device), windows.to(device))


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
    import ray

    from raydist.core.artifact import write_manifest
    from raydist.compress.pareto import choose_winner, pareto_front, plot_pareto

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
    tmp = _copy_for_export(run_dir, winner["artifact"])
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
    out = _publish_export(run_dir, tmp)
    _prune_artifacts(cfg, rows, winner)
    say(
        f"[raydist] winner ({reason}): {json.dumps(winner['candidate'], sort_keys=True)}: ppl {ppl:.4g} "
        f"({winner['quality_loss_pct']:+.1f} %), {winner['disk_bytes'] / 2**20:.1f} MiB "
        f"(x{winner.get('size_ratio', float('nan')):.2f}), {winner['tokens_per_s']:.1f} tok/s "
        f"(x{winner.get('speedup', float('nan')):.2f})"
    )
    say(f"[raydist] artifact: {out}")
    return out


def _copy_for_export(run_dir: Mirror, artifact) -> Path:
    """A fresh local copy of a trial's artifact (a path or URI) next to where the export goes."""
    tmp = run_dir.local / f".{ARTIFACT_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    if storage.is_uri(artifact):
        storage.download(artifact, tmp)
    else:
        shutil.copytree(artifact, tmp)
    return tmp


def _publish_export(run_dir: Mirror, tmp: Path):
    """Move the finished export into place as ``artifact/`` (uploaded manifest last on remote storage)."""
    if run_dir.remote:
        storage.upload(tmp, run_dir.at(ARTIFACT_DIR))
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, run_dir.local / ARTIFACT_DIR)
    return run_dir.at(ARTIFACT_DIR)


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


def finetune_trial(config: dict[str, Any]) -> None:
    """One Tune trial of a fine-tuning sweep: a whole ``run_finetune`` with the trial's overrides."""
    import ray.tune

    from raydist.config.finetune import FinetuneConfig
    from raydist.config.loading import apply_overrides, config_from_dict
    from raydist.train.finetune import run_finetune

    trial_id = ray.tune.get_context().get_trial_id()
    overrides = [f"{k}={v}" for k, v in sorted(config["overrides"].items())]
    data = apply_overrides(config["finetune"], overrides)
    data["run"] = {**data["run"], "name": f"trial-{trial_id}", "output_dir": config["trials_dir"]}
    art = run_finetune(config_from_dict(FinetuneConfig, data), verbose=False)
    m = read_manifest(art)["metrics"]
    ray.tune.report(
        {
            "eval_ppl": m["eval_ppl"],
            "eval_loss": m.get("eval_loss"),
            "artifact": str(art),
            "tokens_per_s": m.get("tokens_per_s"),
            "overrides": json.dumps(config["overrides"], sort_keys=True),
        }
    )


def _finetune_sweep(cfg: SweepConfig, run_dir: Mirror, resuming: bool, say):
    import itertools
    import random

    from ray import tune

    from raydist.core.artifact import write_manifest
    from raydist.core.preflight import preflight_finetune
    from raydist.core.runs import init_ray

    preflight_finetune(cfg.finetune)
    space = cfg.finetune_space.overrides()
    if any(k.startswith("lora.") for k in space) and not cfg.finetune.lora.enabled:
        from raydist.core.preflight import PreflightError

        raise PreflightError("finetune_space sweeps LoRA settings but finetune.lora.enabled is false")
    combos = [dict(zip(space, vals)) for vals in itertools.product(*space.values())]
    s = cfg.search
    if s.algorithm == "random":
        combos = random.Random(s.seed).sample(combos, min(s.num_samples, len(combos)))
    ft = cfg.finetune
    workers_cpus = ft.scaling.num_workers * ft.resources.num_cpus
    init_ray(s.max_concurrent * (cfg.resources.num_cpus + workers_cpus))
    concurrent = _finetune_trials_that_fit(s.max_concurrent, cfg.resources.num_cpus + workers_cpus, say)
    search_alg, num_samples = None, 1
    param_space: dict[str, Any] = {"overrides": tune.grid_search(combos)}
    if s.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        param_space = {"overrides": {k: tune.choice(v) for k, v in space.items()}}
        search_alg = ConcurrencyLimiter(OptunaSearch(metric="eval_ppl", mode="min", seed=s.seed), concurrent)
        num_samples = s.num_samples
    n_trials = num_samples if search_alg else len(combos)
    param_space.update({"finetune": ft.model_dump(mode="json"), "trials_dir": str(run_dir.at("trials"))})
    say(
        f"[raydist] fine-tuning sweep: {n_trials} trial(s) over {', '.join(space)}; each trial is a Ray Train run "
        f"of {ft.scaling.num_workers} worker(s)"
    )
    # the trial only drives a Ray Train run (its workers reserve `finetune.resources`)
    trainable = tune.with_resources(finetune_trial, {"cpu": cfg.resources.num_cpus})
    t0 = time.time()
    grid = _tuner(
        cfg,
        run_dir,
        trainable,
        param_space,
        resuming,
        metric=None,
        mode=None,
        search_alg=search_alg,
        num_samples=num_samples,
        total=n_trials,
        max_concurrent=concurrent,
    ).fit()
    wall = time.time() - t0
    rows = []
    for r in grid:
        m = dict(r.metrics or {})
        row = {"overrides": json.loads(m["overrides"]) if "overrides" in m else (r.config or {}).get("overrides")}
        if r.error is not None:
            row.update(
                status="failed", error=f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:500]}"
            )
        else:
            row.update(
                status="completed", **{k: m.get(k) for k in ("eval_ppl", "eval_loss", "tokens_per_s", "artifact")}
            )
        rows.append(row)
    done = [r for r in rows if r["status"] == "completed" and r.get("eval_ppl") is not None]
    report = {
        "stage": "sweep",
        "target": "finetune",
        "wall_s": wall,
        "space": space,
        "trials": sorted(rows, key=lambda r: r.get("eval_ppl") or math.inf),
    }
    best = min(done, key=lambda r: r["eval_ppl"]) if done else None
    report["winner"] = best
    write_json_atomic(run_dir.local / REPORT, report)
    run_dir.push(REPORT)
    if best is None:
        raise NoCandidateMet(f"no fine-tuning trial completed (report: {run_dir.at(REPORT)})")
    tmp = _copy_for_export(run_dir, best["artifact"])
    inner = read_manifest(tmp)
    write_manifest(
        tmp,
        stage="sweep",
        config=cfg.model_dump(mode="json"),
        parent=inner.get("parent", {}),
        metrics=inner.get("metrics", {}),
        num_parameters=inner.get("num_parameters", 0),
        extra={
            "overrides": best["overrides"],
            "sweep_report": str(run_dir.at(REPORT)),
            "trial_artifact": best["artifact"],
        },
    )
    out = _publish_export(run_dir, tmp)
    for r in rows:
        say(
            f"[raydist]   {json.dumps(r['overrides'], sort_keys=True)}: "
            + (f"eval ppl {r['eval_ppl']:.4g}" if r["status"] == "completed" else f"FAILED {r.get('error')}")
        )
    say(
        f"[raydist] best: {json.dumps(best['overrides'], sort_keys=True)} (eval ppl {best['eval_ppl']:.4g}); "
        f"artifact: {out}"
    )
    return out
