"""Fine-tuning benchmark: raydist's Ray Train overhead, and SmolLM2 LoRA on real data against a TRL peer.

Run from anywhere (it changes to the repository root)::

    .venv/bin/python scripts/bench/finetune_overhead.py            # everything: ~12 min on a quiet 2-core box,
                                                                   # 20-40 min while other jobs share it
    .venv/bin/python scripts/bench/finetune_overhead.py --skip-lora --skip-peer   # overhead only

Part 1 — overhead (``--skip-overhead`` skips it)
    The same full fine-tune of SmolLM2-135M-Instruct (fp32, ZeRO-2, 2 data-parallel ranks, micro batch 2 x
    128 tokens, no grad accumulation, 12 optimizer steps, no eval) runs
      (a) through raydist: ``run_finetune(cfg)`` = Ray Train TorchTrainer + Ray Data + DeepSpeed, and
      (b) through ``_ds_baseline_loop.py`` under ``torchrun --nproc_per_node 2``: the hand-written DeepSpeed
          loop someone would write without raydist, built from the very same config (JSON).
    Both sides run one thread per rank (Ray gives a 1-CPU worker OMP_NUM_THREADS=1; torchrun is given the
    same). A step's time is the gap between consecutive per-step timestamps (raydist: the ``time`` of the
    train records in ``metrics.jsonl``; baseline: taken at the same point of its loop). Steps 1-3 pay for
    warm-up and are dropped; the steady-state step time is the median of the rest. Start-up, tokenization,
    the final checkpoint and export happen outside those gaps. The box is shared, so the sides run
    back-to-back as baseline, raydist, baseline (``--overhead-order``) and the baseline's steps are pooled:
    slow drift in background load then hits both sides alike.
      overhead_ratio = raydist median step time / baseline median step time   (goal <= 1.05)

Noise on a shared 2-core box
    A background thread samples every process's CPU time (``_common.CpuSampler``, psutil) and sorts it into
    the benchmark's own processes (training ranks, Ray daemons and actors, torchrun) and "foreign" ones
    (other people's jobs). A steady step during which foreign processes used under 0.15 core is "quiet";
    when each side has at least 5 quiet steps the medians are taken over those (a few uncontended steps
    say more than many contended ones), otherwise over all steady steps; both are recorded. The same
    per-step CPU figures say where raydist's extra time goes (e.g. Ray's own daemons). ``--wait-quiet-s N``
    waits up to N s for a quiet box before each phase.

Part 2 — SmolLM2 LoRA on real data (``--skip-lora``)
    ``jobs/quickstart.yaml`` unchanged except where the run lives: LoRA r16/alpha32 on q,k,v,o,gate,up,down;
    batch 4 x 256 tokens (2 workers x micro batch 2); lr 2e-4 constant; 20 steps; train on the stdlib's
    ``pydoc_data.topics`` tokens from 8,192 on; eval on its first 4,096 tokens in 512-token windows (at
    start, step 10 and the end). Perplexities are the artifact's ``raydist.json`` figures. Throughput is
    the steady state (median step, warm-up and the step that carries the step-10 eval/checkpoint
    dropped); the figure raydist itself reports (which counts that eval and checkpoint) is kept beside it.

Part 3 — the TRL peer (``--skip-peer``; skipped with a note when ``trl`` is not importable)
    TRL ``SFTTrainer`` + peft LoRA on the same protocol, single process, 2 torch threads: the same
    tokenized blocks (built by raydist's data code from the same config), batch 4, lr 2e-4 constant,
    grad clip 1.0, 20 steps, fp32, no gradient checkpointing (TRL's default turns it on; raydist's is off).
    Its perplexities come from raydist's own ``sum_nll`` on the same eval windows, so the metric is shared.

Results: ``benchmarks/results/finetune.json`` (parts that were skipped keep their previous values, with
their own ``*_measured_at`` stamps and ``part_provenance`` entries; ``provenance`` is this run's) and the
"Fine-tuning" section of ``BENCHMARKS.md``, both written from what this run measured. ``--markdown-only``
rewrites that section from the results file without measuring. A benchmark, not a test; never imported by
raydist.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (scripts/bench is not a package)
    BENCHMARKS_MD,
    FOREIGN,
    REPO,
    RESULTS_DIR,
    CpuSampler,
    machine_line,
    machine_of,
    md_table,
    provenance,
    provenance_line,
    replace_section,
    say,
    versions_of,
)

os.chdir(REPO)  # the quickstart's model path is relative to the repository root
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU box: DeepSpeed's CPU accelerator, gloo
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = RESULTS_DIR / "finetune.json"
SECTION = "## Fine-tuning"
MODEL_DIR = REPO / "models" / "smollm2-135m"
COMMAND = ".venv/bin/python scripts/bench/finetune_overhead.py"
WARMUP_STEPS = 3  # steps 1..3 carry kernel warm-up, data-pipeline start and allocator growth
OVERHEAD_GOAL = 1.05
PEER_REPORTED = {"tokens_per_s": 72.0, "ppl_before": 14.70, "ppl_after": 13.11}  # the brief's peer figures


# ----------------------------------------------------------------------------------------------- helpers


def wait_for_quiet(max_wait_s: float, threshold: float) -> float:
    """On a shared box, wait (up to ``max_wait_s``, ``--wait-quiet-s``) until other jobs use under ``threshold``
    cores, measured over 5 s; returns the last measurement (recorded with each phase). With the default
    ``max_wait_s=0`` a phase starts right after one measurement."""
    deadline = time.time() + max_wait_s
    while True:
        with CpuSampler(period_s=5.0) as sampler:
            time.sleep(5.1)
        busy = foreign_mean(sampler, sampler.samples[0].t, sampler.samples[-1].t) if sampler.samples else 0.0
        if busy < threshold or time.time() >= deadline:
            say(f"other jobs use {busy:.2f} cores at phase start")
            return busy


def step_gaps(times: dict[int, float]) -> dict[int, float]:
    """``{step: seconds since the previous timestamp}`` from ``{step: unix time}`` (step 0 = start, if known)."""
    steps = sorted(times)
    return {b: times[b] - times[a] for a, b in zip(steps, steps[1:]) if b == a + 1}


def steady_median(gaps: dict[int, float], exclude: set[int] = frozenset()) -> float:
    """Median step time over steps past the warm-up, minus ``exclude`` (steps that carry other work)."""
    kept = [dt for s, dt in gaps.items() if s > WARMUP_STEPS and s not in exclude]
    if not kept:
        raise RuntimeError(f"no steady-state steps to time (have {sorted(gaps)})")
    return statistics.median(kept)


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """Train-step records of a raydist run's ``metrics.jsonl`` (they carry ``tokens_per_s``)."""
    from raydist.core.progress import read_history

    return [r for r in read_history(run_dir / "metrics.jsonl") if "tokens_per_s" in r]


def shutdown_ray() -> None:
    """Stop the local Ray so the next phase does not share the 2 cores with idle Ray daemons."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ----------------------------------------------------------------------------------------------- CPU profile


QUIET_SHARE = 0.15  # a step is "quiet" when other jobs used under 0.15 of a core during it
MIN_QUIET_STEPS = 5  # medians over quiet steps need at least this many of them


def foreign_share(sampler: CpuSampler, times: dict[int, float]) -> dict[int, float]:
    """``{step: cores used by foreign processes during that step}`` (0.0 .. 2.0 on this box)."""
    out = {}
    for k in sorted(times):
        if k - 1 in times:
            w = sampler.window(times[k - 1], times[k])
            if w is not None:  # an unsampled step is not known to be quiet
                out[k] = w.cores(FOREIGN)
    return out


def cpu_per_step(sampler: CpuSampler, times: dict[int, float], first_step: int) -> dict[str, float]:
    """CPU seconds per optimizer step, by category, over steps ``first_step+1 ..`` (the steady window)."""
    last = max(times)
    if first_step not in times or last <= first_step:
        return {}
    w = sampler.window(times[first_step], times[last])
    if w is None:
        return {}
    n = last - first_step
    out: dict[str, Any] = {k: round(v / n, 3) for k, v in w.procs.items()}
    if w.threads:
        out["training-rank threads"] = {k: round(v / n, 3) for k, v in w.threads.items() if v / n >= 0.005}
    return out


def steady_stats(gaps: dict[int, float], foreign: dict[int, float], exclude: set[int] = frozenset()) -> dict[str, Any]:
    """Median steady step time, over the quiet steps when there are enough of them, else over all.

    Steady = past the warm-up and not in ``exclude``; quiet = other jobs used under QUIET_SHARE of a core.
    """
    steps = [(s, dt) for s, dt in sorted(gaps.items()) if s > WARMUP_STEPS and s not in exclude]
    if not steps:
        raise RuntimeError(f"no steady-state steps to time (have {sorted(gaps)})")
    every = [dt for _, dt in steps]
    quiet = [dt for s, dt in steps if foreign.get(s, float("inf")) < QUIET_SHARE]
    enough = len(quiet) >= MIN_QUIET_STEPS
    return {
        "step_s": statistics.median(quiet if enough else every),
        "basis": "quiet steady steps" if enough else "all steady steps (too few quiet ones)",
        "step_s_all_steady": statistics.median(every),
        "step_s_quiet": statistics.median(quiet) if quiet else None,
        "quiet_steps": f"{len(quiet)}/{len(every)}",
    }


def foreign_mean(sampler: CpuSampler, t0: float, t1: float) -> float:
    """Cores other jobs used on average over ``[t0, t1]``."""
    w = sampler.window(t0, t1)
    return w.cores(FOREIGN) if w is not None else 0.0


# ----------------------------------------------------------------------------------------------- part 1


def overhead_config(work: Path, args) -> "FinetuneConfig":  # noqa: F821
    """The full fine-tune both sides run; eval and mid-run checkpoints are off so steps are pure training."""
    from raydist.config.finetune import FinetuneConfig

    return FinetuneConfig.model_validate(
        {
            "model": {"path": str(MODEL_DIR)},
            # eval_fraction 0: no eval split, so raydist never evaluates (nor does the baseline).
            "data": {"train": {"builtin": "pydoc_topics"}, "seq_len": args.overhead_seq_len, "eval_fraction": 0.0},
            "lora": {"enabled": False},
            "optim": {"lr": 1e-5, "schedule": "constant", "grad_clip": 1.0},
            "train": {
                "max_steps": args.overhead_steps,
                "micro_batch_size": args.overhead_micro_batch,
                "grad_accum_steps": 1,
                "eval_at_start": False,
                "eval_every": None,
                "checkpoint_every": None,  # raydist still checkpoints once at the end (after the timed steps)
                "keep_checkpoints": 1,
            },
            "deepspeed": {"zero_stage": 2},
            "scaling": {"num_workers": 2},
            "resources": {"num_cpus": 1, "num_gpus": 0},
            "run": {"name": "overhead-raydist", "output_dir": str(work), "resume": "never", "max_failures": 0},
        }
    )


def run_baseline(cfg, work: Path, tag: str) -> dict[str, Any]:
    """One torchrun launch of the hand-written loop; returns its per-step gaps and wall time."""
    from raydist.core.runs import train_worker_env

    cfg_file = work / "baseline_config.json"
    cfg_file.write_text(cfg.model_dump_json())
    out = work / f"baseline_{tag}.json"
    log = work / f"baseline_{tag}.log"
    # OMP_NUM_THREADS=1: the same one thread per rank a 1-CPU Ray Train worker gets. DS_ACCELERATOR: cpu here
    # (set above), cuda when gpu.py runs this loop on a GPU. The allocator settings raydist gives CPU workers
    # too: the comparison is of raydist's work around the same loop, not of glibc's defaults.
    on_gpu = os.environ.get("DS_ACCELERATOR") == "cuda"
    env = {
        **os.environ,
        **train_worker_env({}, on_gpu=on_gpu),
        "OMP_NUM_THREADS": str(int(cfg.resources.num_cpus)),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
    }
    torchrun = Path(sys.executable).parent / "torchrun"  # elsewhere (a system Python): the same module, run by -m
    cmd = [
        *([str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]),
        "--standalone",
        "--nproc_per_node",
        str(cfg.scaling.num_workers),
        str(REPO / "scripts" / "bench" / "_ds_baseline_loop.py"),
        "--config",
        str(cfg_file),
        "--out",
        str(out),
    ]
    say(f"baseline ({tag}): torchrun --nproc_per_node {cfg.scaling.num_workers} _ds_baseline_loop.py (log {log})")
    t0 = time.time()
    with CpuSampler() as sampler, open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.time() - t0
    if rc:
        raise RuntimeError(f"baseline loop failed (exit {rc}); see {log}:\n{log.read_text()[-3000:]}")
    res = json.loads(out.read_text())
    times = dict(enumerate(res["times"]))
    gaps = step_gaps(times)
    cpu = cpu_per_step(sampler, times, WARMUP_STEPS)
    foreign = foreign_share(sampler, times)
    say(f"baseline ({tag}): steps {fmt_gaps(gaps)}; wall {wall:.0f}s")
    say(f"baseline ({tag}): foreign cores per step {fmt_gaps(foreign)}; steady CPU-s/step {cpu}")
    return {
        "gaps": gaps,
        "foreign": foreign,
        "wall_s": wall,
        "losses": res["losses"],
        "torch_threads": res["torch_threads"],
        "cpu_s_per_step": cpu,
        "peak_memory_bytes": res.get("peak_memory_bytes"),
    }


def run_raydist_overhead(cfg) -> dict[str, Any]:
    from raydist.train.finetune import run_finetune

    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if run_dir.exists():  # an earlier R in --overhead-order
        shutil.rmtree(run_dir)
    say("raydist: run_finetune (Ray Train + DeepSpeed)")
    t0 = time.time()
    with CpuSampler() as sampler:
        run_finetune(cfg)
    wall = time.time() - t0
    recs = train_records(run_dir)
    times = {r["step"]: r["time"] for r in recs}
    gaps = step_gaps(times)  # no record before step 1: its gap is unknown
    cpu = cpu_per_step(sampler, times, WARMUP_STEPS)
    foreign = foreign_share(sampler, times)
    say(f"raydist: steps {fmt_gaps(gaps)}; wall {wall:.0f}s")
    say(f"raydist: foreign cores per step {fmt_gaps(foreign)}; steady CPU-s/step {cpu}")
    return {
        "cpu_s_per_step": cpu,
        "foreign": foreign,
        "gaps": gaps,
        "wall_s": wall,
        "losses": [r["loss"] for r in recs],
        "logged_tokens_per_s": {r["step"]: r["tokens_per_s"] for r in recs},
    }


def fmt_gaps(gaps: dict[int, float]) -> str:
    return " ".join(f"{s}:{dt:.2f}" for s, dt in sorted(gaps.items()))


def part_overhead(work: Path, args) -> dict[str, Any]:
    cfg = overhead_config(work, args)
    tokens_per_step = (
        cfg.train.micro_batch_size * cfg.scaling.num_workers * cfg.train.grad_accum_steps * cfg.data.seq_len
    )
    runs: dict[str, list[dict[str, Any]]] = {"B": [], "R": []}
    order = list(args.overhead_order)
    busy_at_start = []

    def steady(side: str) -> list[tuple[float, float]]:
        """(step time, foreign cores) of every steady step of every run of one side, pooled."""
        return [
            (dt, run["foreign"].get(s, float("nan")))
            for run in runs[side]
            for s, dt in run["gaps"].items()
            if s > WARMUP_STEPS
        ]

    def quiet_count(side: str) -> int:
        return sum(1 for _, f in steady(side) if f < QUIET_SHARE)

    i = 0
    while i < len(order):
        side = order[i]
        busy_at_start.append(round(wait_for_quiet(args.wait_quiet_s, args.quiet_cores), 2))
        if side == "B":
            runs["B"].append(run_baseline(cfg, work, f"{len(runs['B']) + 1}"))
        else:
            runs["R"].append(run_raydist_overhead(cfg))
            if not args.keep_runs:  # 0.5 GB of exported weights
                shutil.rmtree(Path(cfg.run.output_dir) / cfg.run.name, ignore_errors=True)
            shutdown_ray()
        i += 1
        # On a busy box one side may have had no quiet steps at all: alternate further (R, B, R, ...)
        # until both have MIN_QUIET_STEPS of them or --max-overhead-runs is reached.
        if i == len(order) and len(order) < args.max_overhead_runs:
            short = [x for x in "RB" if quiet_count(x) < MIN_QUIET_STEPS]
            if short:
                order.append(short[0] if len(short) == 1 else ("R" if order[-1] == "B" else "B"))
                say(
                    f"overhead: too few quiet steps so far (raydist {quiet_count('R')}, baseline {quiet_count('B')}); "
                    f"one more {'raydist' if order[-1] == 'R' else 'baseline'} run"
                )

    # "Quiet" steps are those during which other jobs on the shared box used under QUIET_SHARE of a core:
    # when both sides have enough of them the ratio is taken over those (contention, not raydist, is what
    # makes the other steps slow), else over all steady steps. Both figures are kept.
    ray_all, base_all = steady("R"), steady("B")
    ray_quiet = [dt for dt, f in ray_all if f < QUIET_SHARE]
    base_quiet = [dt for dt, f in base_all if f < QUIET_SHARE]
    ray_step_all = statistics.median(dt for dt, _ in ray_all)
    base_step_all = statistics.median(dt for dt, _ in base_all)
    if len(ray_quiet) >= MIN_QUIET_STEPS and len(base_quiet) >= MIN_QUIET_STEPS:
        basis, ray_step, base_step = "quiet steady steps", statistics.median(ray_quiet), statistics.median(base_quiet)
    else:
        basis, ray_step, base_step = "all steady steps (too few quiet ones)", ray_step_all, base_step_all
    ratio = ray_step / base_step
    say(
        f"overhead: raydist {ray_step:.3f}s vs baseline {base_step:.3f}s per step -> ratio {ratio:.3f} ({basis}; "
        f"quiet steps raydist {len(ray_quiet)}/{len(ray_all)}, baseline {len(base_quiet)}/{len(base_all)})"
    )

    def background_cores(run) -> float:
        """Cores Ray's own daemons and actors (not the ranks) used while this raydist run trained."""
        per_step = sum(v for k, v in run["cpu_s_per_step"].items() if k.startswith("Ray"))
        return per_step / statistics.mean(dt for s, dt in run["gaps"].items() if s > WARMUP_STEPS)

    def gaps_json(run) -> dict[str, float]:
        return {str(k): round(v, 3) for k, v in sorted(run["gaps"].items())}

    def foreign_json(run) -> dict[str, float]:
        return {str(k): round(v, 2) for k, v in sorted(run["foreign"].items())}

    # The raydist run with the most quiet steps is the cleanest CPU profile.
    cleanest = max(
        runs["R"], key=lambda r: sum(1 for s, f in r["foreign"].items() if s > WARMUP_STEPS and f < QUIET_SHARE)
    )
    return {
        "overhead_ratio": ratio,
        "raydist_tokens_per_s": tokens_per_step / ray_step,
        "baseline_tokens_per_s": tokens_per_step / base_step,
        "overhead": {
            "protocol": (
                f"SmolLM2-135M full fine-tune fp32, ZeRO-{cfg.deepspeed.zero_stage}, {cfg.scaling.num_workers} ranks x "
                f"1 thread, micro batch {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens, grad accum 1, "
                f"{cfg.train.max_steps} steps; median of steps {WARMUP_STEPS + 1}..{cfg.train.max_steps}"
            ),
            "order": "".join(order),
            "basis": basis,
            "quiet_share_threshold_cores": QUIET_SHARE,
            "quiet_steps": {
                "raydist": f"{len(ray_quiet)}/{len(ray_all)}",
                "baseline": f"{len(base_quiet)}/{len(base_all)}",
            },
            "tokens_per_step": tokens_per_step,
            "raydist_step_s": ray_step,
            "baseline_step_s": base_step,
            "overhead_ratio_all_steady_steps": ray_step_all / base_step_all,
            "raydist_step_s_all_steady": ray_step_all,
            "baseline_step_s_all_steady": base_step_all,
            "raydist_step_s_per_run": [steady_median(r["gaps"]) for r in runs["R"]],
            "baseline_step_s_per_run": [steady_median(b["gaps"]) for b in runs["B"]],
            "raydist_step_s_min": min(dt for dt, _ in ray_all),
            "baseline_step_s_min": min(dt for dt, _ in base_all),
            "raydist_step_gaps_s": [gaps_json(r) for r in runs["R"]],
            "baseline_step_gaps_s": [gaps_json(b) for b in runs["B"]],
            "raydist_foreign_cores_per_step": [foreign_json(r) for r in runs["R"]],
            "baseline_foreign_cores_per_step": [foreign_json(b) for b in runs["B"]],
            # CPU seconds per steady step by process category (and the ranks' threads): where raydist's
            # extra time goes, and how much CPU other jobs on the shared box took meanwhile ("foreign").
            "raydist_cpu_s_per_step": [r["cpu_s_per_step"] for r in runs["R"]],
            "baseline_cpu_s_per_step": [b["cpu_s_per_step"] for b in runs["B"]],
            "raydist_cpu_s_per_step_cleanest_run": cleanest["cpu_s_per_step"],
            "raydist_ray_background_cores": [background_cores(r) for r in runs["R"]],
            "raydist_ray_background_cores_cleanest_run": background_cores(cleanest),
            "raydist_logged_tokens_per_s_median": statistics.median(
                v for r in runs["R"] for s, v in r["logged_tokens_per_s"].items() if s > WARMUP_STEPS and v
            ),
            "raydist_wall_s": [r["wall_s"] for r in runs["R"]],
            "baseline_wall_s": [b["wall_s"] for b in runs["B"]],
            "raydist_losses": runs["R"][0]["losses"],
            "baseline_losses": runs["B"][0]["losses"],
            "baseline_torch_threads": runs["B"][0]["torch_threads"],
            "foreign_cores_at_phase_start": busy_at_start,
        },
        "overhead_measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ----------------------------------------------------------------------------------------------- part 2


def quickstart_config(work: Path):
    from raydist.config.finetune import FinetuneConfig
    from raydist.config.loading import load_config

    return load_config(
        FinetuneConfig, REPO / "jobs" / "quickstart.yaml", ["run.name=bench-quickstart", f"run.output_dir={work}"]
    )


def steps_after_pauses(cfg) -> set[int]:
    """Steps whose gap also holds the eval and/or checkpoint done at the end of the step before."""
    out = set()
    for k in range(1, (cfg.train.max_steps or 0)):
        if (cfg.train.eval_every and k % cfg.train.eval_every == 0) or (
            cfg.train.checkpoint_every and k % cfg.train.checkpoint_every == 0
        ):
            out.add(k + 1)
    return out


def part_lora(work: Path, args) -> dict[str, Any]:
    from raydist.train.finetune import run_finetune

    cfg = quickstart_config(work)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    load = round(wait_for_quiet(args.wait_quiet_s, args.quiet_cores), 2)
    say("SmolLM2 LoRA (jobs/quickstart.yaml) through raydist")
    t0 = time.time()
    with CpuSampler() as sampler:
        artifact = run_finetune(cfg)
    wall = time.time() - t0
    shutdown_ray()
    manifest = json.loads((Path(artifact) / "raydist.json").read_text())
    m = manifest["metrics"]
    recs = train_records(run_dir)
    times = {r["step"]: r["time"] for r in recs}
    gaps = step_gaps(times)
    foreign = foreign_share(sampler, times)
    stats = steady_stats(gaps, foreign, exclude=steps_after_pauses(cfg))
    step_s = stats["step_s"]
    tokens_per_step = (
        cfg.train.micro_batch_size * cfg.scaling.num_workers * cfg.train.grad_accum_steps * cfg.data.seq_len
    )
    say(
        f"raydist LoRA: steps {fmt_gaps(gaps)}; wall {wall:.0f}s; ppl {m['eval_ppl_before']:.3f} -> {m['eval_ppl']:.3f}"
    )
    say(f"raydist LoRA: foreign cores per step {fmt_gaps(foreign)}; {stats}")
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "smollm2_ppl_before": m["eval_ppl_before"],
        "smollm2_ppl_after": m["eval_ppl"],
        "smollm2_lora_tokens_per_s": tokens_per_step / step_s,
        "lora": {
            "protocol": "jobs/quickstart.yaml: LoRA r16/a32 qkvo+gate/up/down, 2 workers x mb 2 x 256 tok, lr 2e-4 "
            "constant, 20 steps, ZeRO-2, train pydoc tokens 8192+, eval first 4096 tokens in 512-token windows",
            **stats,
            "step_gaps_s": {str(k): round(v, 3) for k, v in sorted(gaps.items())},
            "foreign_cores_per_step": {str(k): round(v, 2) for k, v in sorted(foreign.items())},
            "foreign_cores_mean": foreign_mean(sampler, t0, t0 + wall),
            "steps_excluded_for_eval_or_checkpoint": sorted(steps_after_pauses(cfg)),
            "raydist_reported_tokens_per_s": m.get("tokens_per_s"),
            "train_loss_final": m.get("train_loss"),
            "eval_loss_before": m.get("eval_loss_before"),
            "eval_loss_after": m.get("eval_loss"),
            "wall_s": wall,
            "foreign_cores_at_start": load,
        },
        "lora_measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ----------------------------------------------------------------------------------------------- part 3


def part_peer(work: Path, args) -> dict[str, Any]:
    try:
        import trl  # noqa: F401
    except ImportError:
        say("trl is not importable: peer skipped (install with: .venv/bin/pip install trl torch==<installed>)")
        return {"peer": {"skipped": "trl not installed"}, "peer_measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from raydist.core.data import build_datasets, collate
    from raydist.core.evaluation import perplexity, sum_nll
    from raydist.train.export import peft_lora_config

    cfg = quickstart_config(work)
    torch.set_num_threads(2)  # the peer's setting: one process using both cores
    torch.manual_seed(cfg.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The very blocks raydist trains and evaluates on (same data code, same config).
    train, evals = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    batch = cfg.train.micro_batch_size * cfg.scaling.num_workers  # 4: raydist's global batch
    tokens_per_step = batch * cfg.data.seq_len

    def eval_ppl(model) -> float:
        model.eval()
        batches = (collate(evals[i : i + 2], tokenizer.pad_token_id) for i in range(0, len(evals), 2))
        nll, n = sum_nll(model, batches, torch.device("cpu"))
        model.train()
        return perplexity(nll, n)

    class StepClock(TrainerCallback):
        """Unix time at train start (step 0) and at the end of every optimizer step."""

        def __init__(self):
            self.times: dict[int, float] = {}

        def on_train_begin(self, args_, state, control, **kw):
            self.times[0] = time.time()

        def on_step_end(self, args_, state, control, **kw):
            self.times[state.global_step] = time.time()

    clock = StepClock()
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    sft = SFTConfig(
        output_dir=str(work / "trl-peer"),
        max_steps=cfg.train.max_steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        learning_rate=cfg.optim.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.grad_clip,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps,
        gradient_checkpointing=False,  # TRL's default is True; raydist's quickstart does not recompute
        bf16=False,
        fp16=False,
        use_cpu=True,
        packing=False,  # the blocks are already packed to 256 tokens
        max_length=cfg.data.seq_len,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=cfg.train.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=sft,
        train_dataset=Dataset.from_list([{"input_ids": ex["input_ids"]} for ex in train]),
        processing_class=tokenizer,
        peft_config=peft_lora_config(cfg.lora),
        callbacks=[clock],
    )
    load = round(wait_for_quiet(args.wait_quiet_s, args.quiet_cores), 2)
    say("TRL peer: SFTTrainer + peft LoRA, 1 process x 2 threads")
    ppl_before = eval_ppl(trainer.model)
    with CpuSampler() as sampler:
        out = trainer.train()
    ppl_after = eval_ppl(trainer.model)
    gaps = step_gaps(clock.times)
    foreign = foreign_share(sampler, clock.times)
    stats = steady_stats(gaps, foreign)
    step_s = stats["step_s"]
    say(f"TRL peer: steps {fmt_gaps(gaps)}; ppl {ppl_before:.3f} -> {ppl_after:.3f}")
    say(f"TRL peer: foreign cores per step {fmt_gaps(foreign)}; {stats}")
    shutil.rmtree(work / "trl-peer", ignore_errors=True)
    return {
        "peer": {
            "what": "TRL SFTTrainer + peft LoRA, same blocks/batch/lr/steps, 1 process x 2 threads, fp32",
            "tokens_per_s": tokens_per_step / step_s,
            "tokens_per_s_train_runtime": cfg.train.max_steps * tokens_per_step / out.metrics["train_runtime"],
            **stats,
            "step_gaps_s": {str(k): round(v, 3) for k, v in sorted(gaps.items())},
            "foreign_cores_per_step": {str(k): round(v, 2) for k, v in sorted(foreign.items())},
            "foreign_cores_mean": foreign_mean(sampler, clock.times[0], max(clock.times.values())),
            "ppl_before": ppl_before,
            "ppl_after": ppl_after,
            "train_loss": out.metrics.get("train_loss"),
            "foreign_cores_at_start": load,
        },
        "peer_measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ----------------------------------------------------------------------------------------------- report


def ratio_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, raydist, reference, ratio) rows for the console and BENCHMARKS.md."""
    rows = []
    if "overhead_ratio" in r:
        o = r["overhead"]
        rows.append(
            (
                "full FT step time, s (lower is better)",
                f"{o['raydist_step_s']:.3f}",
                f"{o['baseline_step_s']:.3f} (DeepSpeed + torchrun)",
                f"{r['overhead_ratio']:.3f} (goal <= {OVERHEAD_GOAL})",
            )
        )
        rows.append(
            (
                "full FT tokens/s",
                f"{r['raydist_tokens_per_s']:.1f}",
                f"{r['baseline_tokens_per_s']:.1f} (DeepSpeed + torchrun)",
                f"{r['raydist_tokens_per_s'] / r['baseline_tokens_per_s']:.3f}",
            )
        )
    peer = r.get("peer") or {}
    has_peer = "tokens_per_s" in peer
    if "smollm2_lora_tokens_per_s" in r:
        ref = (
            f"{peer['tokens_per_s']:.1f} (TRL, this run)"
            if has_peer
            else f"{PEER_REPORTED['tokens_per_s']:.0f} (TRL, reported)"
        )
        ref_v = peer["tokens_per_s"] if has_peer else PEER_REPORTED["tokens_per_s"]
        rows.append(
            (
                "SmolLM2 LoRA tokens/s",
                f"{r['smollm2_lora_tokens_per_s']:.1f}",
                ref,
                f"{r['smollm2_lora_tokens_per_s'] / ref_v:.3f}",
            )
        )
        for key, label in (
            ("before", "SmolLM2 eval ppl before"),
            ("after", "SmolLM2 eval ppl after (lower is better)"),
        ):
            mine = r[f"smollm2_ppl_{key}"]
            ref_v = peer[f"ppl_{key}"] if has_peer else PEER_REPORTED[f"ppl_{key}"]
            tag = "TRL, this run" if has_peer else "TRL, reported"
            rows.append((label, f"{mine:.3f}", f"{ref_v:.3f} ({tag})", f"{mine / ref_v:.3f}"))
    return rows


def print_table(rows) -> None:
    head = ("metric", "raydist", "reference", "raydist / reference")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(4)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print("\n" + line(head))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print()


def _parts_note(r: dict[str, Any]) -> str:
    """Which parts' figures come from earlier runs than the one ``provenance`` names (and whether theirs is known)."""
    label = {"overhead": "overhead", "lora": "LoRA", "peer": "TRL peer"}
    ran = r.get("script_parts_run") or []
    older = [p for p in label if p not in ran and f"{p}_measured_at" in r]
    if not older or not ran:
        return ""
    unknown = [p for p in older if p not in (r.get("part_provenance") or {})]
    words = lambda ps: " and ".join(label[p] for p in ps)  # noqa: E731
    return (
        f" That run measured the {words(ran)} part; the {words(older)} figures come from earlier runs (dated below"
        + (f"; the code the {words(unknown)} figures measured was not recorded" if unknown else "")
        + ")."
    )


def markdown_section(r: dict[str, Any], rows, wall_s: Optional[float]) -> str:
    v = versions_of(r)
    tools = ", ".join(f"{k} {v.get(k) or 'not installed'}" for k in ("torch", "ray", "deepspeed", "transformers"))
    tools += f", peft {v.get('peft') or 'not installed'}, trl {v.get('trl') or 'not installed'}"
    lines = [
        SECTION,
        "",
        f"Command: `{COMMAND}` (flags `--skip-overhead`, `--skip-lora`, `--skip-peer` rerun parts; "
        f"results in `benchmarks/results/finetune.json`). This section is written by the script.",
        "",
        provenance_line(r.get("provenance")) + _parts_note(r),
        "",
        f"Machine: {machine_line(machine_of(r))}; shared with other work, so timings are noisy. {tools}.",
        "",
        *md_table(("metric", "raydist", "reference", "raydist / reference"), rows),
        "",
    ]
    if "overhead" in r:
        o = r["overhead"]

        def cleanest(foreign_runs: list[dict[str, float]]) -> int:
            quiet = [sum(1 for k, f in fr.items() if int(k) > WARMUP_STEPS and f < QUIET_SHARE) for fr in foreign_runs]
            return quiet.index(max(quiet))

        rc = o["raydist_cpu_s_per_step"][cleanest(o["raydist_foreign_cores_per_step"])]
        bc = o["baseline_cpu_s_per_step"][cleanest(o["baseline_foreign_cores_per_step"])]
        r_threads, b_threads = rc.get("training-rank threads", {}), bc.get("training-rank threads", {})
        r_train = max(r_threads.values(), default=0.0)  # the thread that runs the training loop
        b_train = max(b_threads.values(), default=0.0)
        ray_parts = sorted(((k, v) for k, v in rc.items() if k.startswith("Ray")), key=lambda kv: -kv[1])
        fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        lines += [
            f"- Overhead ({r.get('overhead_measured_at')}): {o['protocol']}. Runs back-to-back in the order "
            f"{'-'.join(o['order'])} (B = hand-written DeepSpeed loop under torchrun, R = raydist on Ray Train), steps "
            f"pooled per side (per-run medians: raydist {fmt(o['raydist_step_s_per_run'])} s, baseline "
            f"{fmt(o['baseline_step_s_per_run'])} s). Ratio basis: {o['basis']}; a step is quiet when other jobs on "
            "the "
            f"box used < {QUIET_SHARE} core during it (quiet steps: raydist {o['quiet_steps']['raydist']}, baseline "
            f"{o['quiet_steps']['baseline']}). Over all steady steps the ratio is "
            f"{o['overhead_ratio_all_steady_steps']:.3f}.",
            f"- Where raydist's extra time goes (CPU-s per steady step from /proc, the least disturbed run of each "
            f"side): the training threads of both ranks {r_train:.2f} (raydist) vs {b_train:.2f} (baseline), all rank "
            f"threads {rc.get('training ranks', 0):.2f} vs {bc.get('training ranks', 0):.2f}; beside the ranks, Ray's "
            f"own daemons and actors used {sum(v for _, v in ray_parts):.2f} CPU-s per step = "
            f"{o['raydist_ray_background_cores_cleanest_run']:.3f} cores of the 2, led by "
            + ", ".join(f"{k[k.index('(') + 1 : -1]} {v:.3f}" for k, v in ray_parts[:6])
            + ".",
        ]
    if "lora" in r:
        lo = r["lora"]
        lines += [
            f"- LoRA ({r.get('lora_measured_at')}): {lo['protocol']}. tokens/s is the steady state: median step over "
            f"steps {WARMUP_STEPS + 1}+ without step(s) {lo['steps_excluded_for_eval_or_checkpoint']} (their gap also "
            "holds the "
            f"step-10 eval + checkpoint), basis: {lo['basis']}, {lo['quiet_steps']} quiet. raydist's own figure in "
            f"raydist.json is {lo['raydist_reported_tokens_per_s']:.1f} tokens/s (it counts that eval + checkpoint as "
            f"training time). Whole run {lo['wall_s']:.0f} s; other jobs used {lo['foreign_cores_mean']:.2f} cores on "
            "average.",
        ]
    peer = r.get("peer") or {}
    if "tokens_per_s" in peer:
        lines += [
            f"- TRL peer ({r.get('peer_measured_at')}): {peer['what']}; ppl from raydist's `sum_nll` on the same eval "
            f"windows; tokens/s measured like raydist's (median steady step, basis: {peer['basis']}, "
            f"{peer['quiet_steps']} "
            f"quiet); {peer['tokens_per_s_train_runtime']:.1f} tokens/s from TRL's own train_runtime; other jobs used "
            f"{peer['foreign_cores_mean']:.2f} cores on average. As first reported, the peer got "
            f"{PEER_REPORTED['tokens_per_s']:.0f} tokens/s and ppl {PEER_REPORTED['ppl_before']} -> "
            f"{PEER_REPORTED['ppl_after']}.",
        ]
    elif peer.get("skipped"):
        lines += [f"- TRL peer skipped: {peer['skipped']}; the reference column shows the peer's reported figures."]
    if wall_s is not None:
        ran = ", ".join(r.get("script_parts_run", []))
        each = ", ".join(
            f"{p} {r[p + '_wall_s'] / 60:.1f} min" for p in ("overhead", "lora", "peer") if p + "_wall_s" in r
        )
        lines += [
            f"- The script's last run ({ran}) took {wall_s / 60:.1f} min; the latest time of each part: {each} "
            f"(contended runs take longer)."
        ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description="raydist fine-tuning benchmark (see the module docstring)")
    ap.add_argument("--skip-overhead", action="store_true", help="skip part 1 (Ray Train vs torchrun overhead)")
    ap.add_argument("--skip-lora", action="store_true", help="skip part 2 (SmolLM2 LoRA quickstart protocol)")
    ap.add_argument("--skip-peer", action="store_true", help="skip part 3 (TRL SFTTrainer peer)")
    ap.add_argument("--overhead-steps", type=int, default=12, help="optimizer steps per overhead run")
    ap.add_argument("--overhead-seq-len", type=int, default=128, help="tokens per sequence in the overhead runs")
    ap.add_argument("--overhead-micro-batch", type=int, default=2, help="sequences per rank per step (overhead)")
    ap.add_argument("--overhead-order", default="BRB", help="run order of Baseline/Raydist, e.g. BRB or BR")
    ap.add_argument(
        "--max-overhead-runs",
        type=int,
        default=7,
        help="keep alternating R/B runs (up to this many in all) while a side has fewer than 5 quiet steps",
    )
    ap.add_argument(
        "--wait-quiet-s", type=float, default=0, help="wait up to this long for a quiet box before each phase"
    )
    ap.add_argument("--quiet-cores", type=float, default=0.3, help="CPU use of other jobs (cores) that counts as quiet")
    ap.add_argument("--keep-runs", action="store_true", help="keep the run directories (printed) for inspection")
    ap.add_argument(
        "--no-write", action="store_true", help="print only; leave the results file and BENCHMARKS.md alone"
    )
    ap.add_argument(
        "--markdown-only",
        action="store_true",
        help=f"rewrite the {SECTION[3:]} section of BENCHMARKS.md from {RESULTS.name} without measuring",
    )
    args = ap.parse_args()
    if args.markdown_only:
        results = json.loads(RESULTS.read_text())
        replace_section(markdown_section(results, ratio_rows(results), results.get("script_wall_s")))
        say(f"rewrote the {SECTION[3:]} section of {BENCHMARKS_MD.name} from {RESULTS.relative_to(REPO)}")
        return
    if set(args.overhead_order) - {"B", "R"} or "R" not in args.overhead_order or "B" not in args.overhead_order:
        ap.error("--overhead-order takes B and R letters with at least one of each")

    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="raydist-bench-ft-"))
    say(f"work dir {work}")
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.pop("machine", None)  # older files kept it here; it is in provenance now
    results["provenance"] = provenance(extra_versions=("trl",))
    parts = {"overhead": part_overhead, "lora": part_lora, "peer": part_peer}
    skip = {"overhead": args.skip_overhead, "lora": args.skip_lora, "peer": args.skip_peer}
    # Parts that were skipped keep their figures from earlier runs: each part records the run it comes from.
    part_provenance = results.setdefault("part_provenance", {})
    for name in parts:
        if not skip[name]:
            part_provenance[name] = results["provenance"]
    try:
        for name, part in parts.items():
            if skip[name]:
                continue
            t0 = time.time()
            results.update(part(work, args))
            results[f"{name}_wall_s"] = time.time() - t0  # includes any --wait-quiet-s waiting
    finally:
        shutdown_ray()
        if not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.time() - t_start
    results["script_wall_s"] = wall
    results["script_parts_run"] = [name for name in parts if not skip[name]]

    rows = ratio_rows(results)
    print_table(rows)
    say(f"took {wall / 60:.1f} min")
    if args.no_write:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    replace_section(markdown_section(results, rows, wall))
    say(f"wrote {RESULTS.relative_to(REPO)} and the {SECTION[3:]} section of {BENCHMARKS_MD.name}")


if __name__ == "__main__":
    main()
