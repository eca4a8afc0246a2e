"""The fine-tuning hyperparameter sweep (``target: finetune``): each Ray Tune trial is a whole ``run_finetune``
(Ray Train + DeepSpeed inside the trial); the winner is the lowest eval perplexity."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from typing import Any

import ray
import ray.tune
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from raydist.config.finetune import FinetuneConfig
from raydist.config.loading import apply_overrides, config_from_dict
from raydist.config.sweep import SweepConfig
from raydist.core.artifact import read_manifest, write_json_atomic, write_manifest
from raydist.core.preflight import PreflightError, preflight_finetune
from raydist.core.resources import SKIP_CHECK_ENV
from raydist.core.runs import init_ray
from raydist.core.storage import Mirror
from raydist.sweep.tuning import REPORT, NoCandidateMet, copy_for_export, make_tuner, publish_export
from raydist.train.finetune import run_finetune


def trials_that_fit(wanted: int, cpus_per_trial: float, say) -> int:
    """How many fine-tuning trials may run at once on this cluster's CPUs.

    A trial reserves its own CPU(s) from Tune and then asks for a Ray Train worker group apart; trials started
    beyond what the CPUs hold would each keep their own reservation and wait forever for their workers
    (a deadlock, seen with 2 trials of 1 + 2 CPUs on 4). ``RAYDIST_SKIP_PLACEMENT_CHECK=1`` (an autoscaling
    cluster whose nodes are not up yet) keeps ``wanted``.

    Raises:
        PreflightError: not even one trial fits.
    """

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


def finetune_trial(config: dict[str, Any]) -> None:
    """One Tune trial of a fine-tuning sweep: a whole ``run_finetune`` with the trial's overrides."""

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


def finetune_sweep(cfg: SweepConfig, run_dir: Mirror, resuming: bool, say):

    preflight_finetune(cfg.finetune)
    space = cfg.finetune_space.overrides()
    if any(k.startswith("lora.") for k in space) and not cfg.finetune.lora.enabled:
        raise PreflightError("finetune_space sweeps LoRA settings but finetune.lora.enabled is false")
    combos = [dict(zip(space, vals)) for vals in itertools.product(*space.values())]
    s = cfg.search
    if s.algorithm == "random":
        combos = random.Random(s.seed).sample(combos, min(s.num_samples, len(combos)))
    ft = cfg.finetune
    workers_cpus = ft.scaling.num_workers * ft.resources.num_cpus
    init_ray(s.max_concurrent * (cfg.resources.num_cpus + workers_cpus))
    concurrent = trials_that_fit(s.max_concurrent, cfg.resources.num_cpus + workers_cpus, say)
    search_alg, num_samples = None, 1
    param_space: dict[str, Any] = {"overrides": tune.grid_search(combos)}
    if s.algorithm == "optuna":
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
    grid = make_tuner(
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
    tmp = copy_for_export(run_dir, best["artifact"])
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
    out = publish_export(run_dir, tmp)
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
