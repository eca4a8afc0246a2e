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

from pathlib import Path
from typing import Any

from raydist.config.sweep import SweepConfig
from raydist.sweep.tuning import ARTIFACT_DIR, NoCandidateMet


def run_sweep(cfg: SweepConfig, *, verbose: bool = True) -> Path:
    """Run (or resume) the sweep; return the exported winner's directory.

    Raises:
        PreflightError / ConfigError / RunDirError: before any trial starts.
        NoCandidateMet: after the sweep, when no candidate met the policy (``sweep_report.json`` says why).
    """
    # the sweeps import Ray Tune: only here, so `raydist validate` (preflight_sweep) does not load Ray
    from raydist.core.runs import open_run_dir, with_absolute_paths
    from raydist.sweep.compression import compress_sweep
    from raydist.sweep.hyperparameter import finetune_sweep

    say = print if verbose else (lambda *a, **k: None)
    cfg = with_absolute_paths(cfg)
    if cfg.target == "finetune":
        cfg = cfg.model_copy(update={"finetune": with_absolute_paths(cfg.finetune)})
        run_dir, resuming = open_run_dir(cfg, ARTIFACT_DIR)
        say(f"[raydist] run dir: {run_dir.location} ({'resuming' if resuming else 'new sweep'})")
        return finetune_sweep(cfg, run_dir, resuming, say)
    candidates = preflight_sweep(cfg)
    from raydist.core.resources import plan_units
    from raydist.core.runs import init_ray

    plans = []

    def place() -> None:  # refused (PreflightError) before anything is written
        init_ray(cfg.search.max_concurrent * cfg.resources.num_cpus)
        plans.append(plan_units(cfg.resources, cfg.search.max_concurrent, "sweep trial"))

    run_dir, resuming = open_run_dir(cfg, ARTIFACT_DIR, prepare=place)
    plan = plans[0]
    say(f"[raydist] run dir: {run_dir.location} ({'resuming' if resuming else 'new sweep'})")
    return compress_sweep(cfg, run_dir, resuming, candidates, plan, say)


def preflight_sweep(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Everything that can be checked before Ray starts; returns the distinct candidates.

    The device is not decided here: each trial computes where Ray placed it (``resources``).

    Raises:
        PreflightError: unknown model, an unsupported scheme / group size, a structured request the model
            cannot meet.
    """
    from raydist.compress.candidate import CandidateError, structured_plan
    from raydist.compress.quant.layer import check_scheme
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
                check_scheme(scheme, g)
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


__all__ = ["ARTIFACT_DIR", "NoCandidateMet", "preflight_sweep", "run_sweep"]
