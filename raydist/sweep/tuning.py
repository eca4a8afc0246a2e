"""What both sweeps share: the run directory's outputs, Ray Tune's tuner and searchers, ASHA that spares
candidates still meeting the winner policy, the progress line, and the winner's export."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from raydist.config.sweep import KNOBS, SweepConfig
from raydist.core import storage
from raydist.core.progress import console
from raydist.core.storage import Mirror

ARTIFACT_DIR = "artifact"


REPORT = "sweep_report.json"


PLOT = "pareto.png"


class NoCandidateMet(RuntimeError):
    """The sweep finished but no candidate met the winner policy (the report is written)."""


# ----------------------------------------------------------------------------------------------- driver


def policy_aware_asha(protect: list[float]):
    """ASHA over the eval budgets (one rung each) that never stops a candidate whose perplexity at a rung is
    at most ``protect[rung]`` (the base model's perplexity at that budget times the policy's allowance).

    With few trials plain ASHA's cut (the rung's median) can drop a candidate that is within the policy's
    allowance only because a base-like one reported first, and a candidate the policy would pick never completes.
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


def progress_callback(total: int, target: str):
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


def make_tuner(
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
            callbacks=[progress_callback(total, cfg.target)],
        ),
    )


def make_searcher(cfg: SweepConfig, candidates: list[dict[str, Any]]):
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


def copy_for_export(run_dir: Mirror, artifact) -> Path:
    """A fresh local copy of a trial's artifact (a path or URI) next to where the export goes."""
    tmp = run_dir.local / f".{ARTIFACT_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    if storage.is_uri(artifact):
        storage.download(artifact, tmp)
    else:
        shutil.copytree(artifact, tmp)
    return tmp


def publish_export(run_dir: Mirror, tmp: Path):
    """Move the finished export into place as ``artifact/`` (uploaded manifest last on remote storage)."""
    if run_dir.remote:
        storage.upload(tmp, run_dir.at(ARTIFACT_DIR))
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, run_dir.local / ARTIFACT_DIR)
    return run_dir.at(ARTIFACT_DIR)
