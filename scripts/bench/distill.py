"""Distillation benchmark: a student pruned from SmolLM2-135M-Instruct, KD vs. cross-entropy, cache vs. online.

Run from anywhere (it changes to the repository root)::

    .venv/bin/python scripts/bench/distill.py                     # everything, ~1 h on 2 CPU cores (estimate)
    .venv/bin/python scripts/bench/distill.py --steps 3 --no-write # a smoke run to size the full one
    .venv/bin/python scripts/bench/distill.py --out /tmp/d --reuse-teacher /tmp/d/runs/teacher-XXXX/artifact

Every model below is trained and evaluated by raydist's own public stage functions
(``raydist.train.finetune.run_finetune`` / ``raydist.distill.distill.run_distill``, configs validated by
``config_from_dict``), 2 Ray Train CPU workers, DeepSpeed ZeRO-2, fp32. The perplexities are the ones the
artifacts' ``raydist.json`` manifests record.

Data (``--seed-tasks``, default ``../shared/data/seed_tasks.jsonl``; CC BY-NC, never copied into the repo)
    The 175 self-instruct seed tasks, instruction format (raydist expands ``instances`` and puts the loss
    on response tokens only): 150 tasks are the training data, 25 the held-out eval (``--split random``,
    the default: 25 drawn with seed 0; ``--split tail``: the file's last 25, all classification tasks).
    Eval = response-token perplexity on those 25 tasks (raydist's eval when ``data.eval`` is that file).
    Both files are written into the run's work directory at run time.

1. Teacher correction (``--reuse-teacher DIR`` skips it)
    ``run_finetune``: LoRA r16/alpha32 on q,k,v,o,gate,up,down, batch 4 (2 workers x micro 2), seq_len 512,
    lr 3e-4 (3 warmup steps, cosine to 10 %), ``--teacher-steps`` steps. Its merged artifact is the teacher.
    ``teacher_ppl_uncorrected`` = the run's ``eval_ppl_before``; the corrected teacher's perplexity is the
    distillation runs' own ``teacher_ppl`` (the same eval, measured by the distill stage).

2. Students (``student.source: pruned``, derived from the corrected teacher inside ``run_distill``)
    ``--drop-layers`` least-important layers removed and ``--mlp-keep`` of the MLP channels kept (ranked by
    activations on 8 training sequences), ~54 % of the teacher's parameters by default. The same pruned
    init, data order, batch (4 x <=512 tokens), lr and number of steps for every student:
      * KD  — ``kd.loss`` forward KL at ``--temperature`` mixed with ``--ce-weight`` of cross-entropy,
              online teacher (``kd_student_ppl``);
      * CE  — ``kd.ce_weight: 1.0``: plain cross-entropy through the same distill code path
              (``ce_student_ppl``). It trains in cache mode (reusing the KD run's cache, or building it),
              which only saves the teacher forward that a weight of 0 on the KD term would throw away
              (``--ce-online`` runs it with the online teacher instead);
      * extra KD settings, each one more online run, reported beside the headline KD run and never
        substituted for it: by default T=2 and a 50 % CE mix (``--kd-variant temperature=2,ce_weight=0.5
        [,lr=...]`` repeatable replaces them, ``--no-variants`` drops them).

   Generation comparison: CE, off-policy KD and on-policy KD from a student that can already write answers
   (``--gen-drop-layers`` 4, ``--gen-mlp-keep`` 1.0; the headline student's greedy answers are repetitive
   babble after 30 steps whatever the method, so a generation metric cannot rank methods there). Same recipe,
   data, steps and eval as above; when the shape equals the headline student's, its runs are reused.

   On-policy KD (``--skip-on-policy`` skips it): that student's KD run with ``kd.on_policy`` at λ = 1 and at
   λ = 0.5 (``--on-policy-lmbda``, repeatable): for those micro-batches the student samples
   ``--op-max-new-tokens`` tokens of each prompt at ``--op-temperature`` and learns the teacher's
   distribution on them (``--op-loss``, reverse KL by default; ``--op-start-step`` steps of off-policy KD
   first); the rest train on the responses. ``--op-warm-start S`` adds one more run, λ = 1 from step S + 1
   after S steps of off-policy KD (on-policy distillation of a student that has first learned from the
   responses, as the published recipes do); it is recorded beside the others, and the goal stays decided by
   the λ = 1 run.

   Generation metric (``--skip-generation`` skips it): every student (and the teacher) answers each held-out
   instance greedily (``--gen-max-new-tokens``, the prompt rendered as in training); score = ROUGE-L F1 against
   the reference answer (Google's ``rouge-score``, stemmed), mean over instances with a 95 % bootstrap interval
   and paired differences (on-policy − off-policy, on-policy − CE). On-policy KD's gain is expected to show in
   generations more than in teacher-forced perplexity.

3. Cache vs. online (``--skip-cache`` skips it)
    The headline KD run again with ``kd.teacher_mode: cache`` (``--cache-entries``: by default top-64
    log-probabilities + the missing mass; ``--also-cache-entries`` adds one run per other kind, for quality and
    size), built once by a Ray Data batch-inference job on 2 actors into ``<out>/teacher_cache*``; the build
    time is the one raydist prints. Step time = the gap between consecutive step records' ``time`` in
    ``<run_dir>/metrics.jsonl``; steps 1-2 are dropped and the median of the rest is the steady state.
      cache_speedup = online median step time / cache median step time        (goal >= 2)
    Both runs see the same batches in the same order, so the median of the per-step ratios is also given
    (less sensitive to a long batch landing in one side's window). Eval perplexities of both: goal within 1 %.

   With a teacher >= 4x the student (``--skip-big-teacher`` skips it): the same pair of KD runs, online and
   from the same cache, with a much smaller student (``--small-drop-layers`` 28, ``--small-mlp-keep`` 0.5:
   ~33M parameters, most of them the tied embedding, against the teacher's 135M), one cache run per
   ``--small-cache-entries`` kind (default: ``--cache-entries``; the first kind gives the goal figures), once per
   ``--small-zero-stage`` (default: 2, the protocol's, and 0, plain data parallelism, which is what a student
   this small needs: ZeRO-2 shards optimizer state and gradients at the price of extra passes and collectives
   per step, and the goal figures are the lowest stage's): ``cache_speedup_big_teacher``
   (goal >= 2), ``cache_ppl_rel_diff`` (cache / online eval ppl - 1, goal within 1 %), and that cache's
   ``cache_bytes_per_token_big_teacher`` (payload; ``big_teacher.cache_disk_bytes_per_token`` after Parquet's
   compression; the top-level ``cache_bytes_per_token`` is the headline cache's).

Runs are named by a hash of their config under ``<out>/runs``; a completed run found there is reused
(so ``--out`` makes a partial rerun cheap), and reused runs are marked as such in the results.

Results: ``benchmarks/results/distill.json`` (with the run's ``provenance``: commit, command, machine,
versions; the generation metric as ``ce_gen_score``, ``offpolicy_gen_score``, ``onpolicy_gen_score`` with
``*_ci95`` and the paired ``onpolicy_vs_offpolicy_gen`` / ``onpolicy_vs_ce_gen``) and the "Distillation"
section of ``BENCHMARKS.md`` (only that section is replaced; the file is re-read just before writing;
``--markdown-only`` rewrites it from the results file without measuring). A
benchmark, not a test; never imported by raydist.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (scripts/bench is not a package)
    BENCHMARKS_MD,
    RANKS,
    REPO,
    RESULTS_DIR,
    CpuSampler,
    loadavg,
    machine_line,
    machine_of,
    md_table,
    provenance,
    provenance_line,
    replace_section,
    say,
    versions_of,
)

os.chdir(REPO)
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = RESULTS_DIR / "distill.json"
SECTION = "## Distillation"
MODEL_DIR = REPO / "models" / "smollm2-135m"
SEED_TASKS = (REPO / ".." / "shared" / "data" / "seed_tasks.jsonl").resolve()
COMMAND = ".venv/bin/python scripts/bench/distill.py"
DROP_STEPS = 2  # steps 1-2 carry warm-up (allocator growth, first DeepSpeed step, data pipeline start)
N_TRAIN_TASKS = 150
# The cache job: one teacher actor per core; one sequence per forward, because the rows' lengths vary a lot
# (30..512 tokens, in training order) and padding them to a batch of 8 more than doubles the tokens run.
CACHE_ACTORS, CACHE_BATCH = 2, 1
# The figures a peer tool measured on the same protocol (issue 3): CE-only is the bar KD must clear.
# Extra online KD runs beside the headline one (forward KL, T=1, no CE): a softer teacher, and a CE mix.
DEFAULT_VARIANTS = ("temperature=2", "ce_weight=0.5")
PEER = {"teacher_ppl_uncorrected": 12.73, "pruned_25pct_mlp_before": 19.33, "ce_30_steps": 11.65}


# ----------------------------------------------------------------------------------------------- data


def split_seed_tasks(src: Path, work: Path, split: str = "random") -> tuple[Path, Path, dict[str, int]]:
    """150 tasks -> train.jsonl, the other 25 -> eval.jsonl, in the work dir (never in the repo).

    ``split="tail"`` takes the file's first 150 tasks for training; the file lists its classification tasks
    last, so all 25 eval tasks are then classification tasks with 1-3-token answers (~105 target tokens:
    a very noisy eval). ``split="random"`` (default) shuffles the tasks with a fixed seed (0) first.
    """
    if not src.is_file():
        raise SystemExit(f"seed tasks not found at {src} (pass --seed-tasks)")
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()]
    if split == "random":
        random.Random(0).shuffle(lines)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, evals = data / "train.jsonl", data / "eval.jsonl"
    train.write_text("\n".join(lines[:N_TRAIN_TASKS]) + "\n")
    evals.write_text("\n".join(lines[N_TRAIN_TASKS:]) + "\n")
    n_inst = lambda ls: sum(len(json.loads(x).get("instances", [None])) for x in ls)  # noqa: E731
    n_cls = lambda ls: sum(bool(json.loads(x).get("is_classification")) for x in ls)  # noqa: E731
    return (
        train,
        evals,
        {
            "split": split,
            "train_tasks": len(lines[:N_TRAIN_TASKS]),
            "eval_tasks": len(lines[N_TRAIN_TASKS:]),
            "train_classification_tasks": n_cls(lines[:N_TRAIN_TASKS]),
            "eval_classification_tasks": n_cls(lines[N_TRAIN_TASKS:]),
            "train_instances": n_inst(lines[:N_TRAIN_TASKS]),
            "eval_instances": n_inst(lines[N_TRAIN_TASKS:]),
        },
    )


def data_section(args, train: Path, evals: Path) -> dict[str, Any]:
    return {
        "train": {"path": str(train), "format": "instruction"},
        "eval": {"path": str(evals), "format": "instruction"},
        "seq_len": args.seq_len,
    }


# ----------------------------------------------------------------------------------------------- configs


def teacher_config(args, train: Path, evals: Path) -> dict[str, Any]:
    return {
        "model": {"path": str(MODEL_DIR)},
        "data": data_section(args, train, evals),
        "lora": {
            "enabled": True,
            "r": 16,
            "alpha": 32,
            "dropout": 0.05,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        "optim": {
            "lr": args.teacher_lr,
            "warmup_steps": min(3, args.teacher_steps - 1),
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "grad_clip": 1.0,
        },
        "train": {"max_steps": args.teacher_steps, "micro_batch_size": 2, "seed": args.seed},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 2},
    }


def student_config(
    args,
    teacher: Path,
    train: Path,
    evals: Path,
    out: Path,
    *,
    kd: dict[str, Any],
    lr: float,
    shape: Optional[tuple[int, float]] = None,
    zero_stage: int = 2,
) -> dict[str, Any]:
    """A student run's config; ``shape``: (layers dropped, MLP share kept) of another student than the headline
    one (the cache-speed comparison's small student, the generation comparison's mildly pruned one)."""
    drop, keep = shape or (args.drop_layers, args.mlp_keep)
    return {
        "teacher": {"path": str(teacher)},
        "student": {
            "source": "pruned",
            "prune": {"drop_layers": drop, "mlp_keep_ratio": keep, "calibration_batches": 8},
        },
        "data": data_section(args, train, evals),
        "kd": {
            "loss": "forward_kl",
            "top_k": args.top_k,
            "cache_dir": str(out / "teacher_cache"),
            "cache_actors": CACHE_ACTORS,
            "cache_batch_size": CACHE_BATCH,
            **kd,
        },
        "optim": {
            "lr": lr,
            "warmup_steps": min(3, args.steps - 1),
            "schedule": "cosine",
            "min_lr_ratio": 0.1,
            "grad_clip": 1.0,
        },
        "train": {"max_steps": args.steps, "micro_batch_size": 2, "seed": args.seed},
        "deepspeed": {"zero_stage": zero_stage},
        "scaling": {"num_workers": 2},
    }


VARIANT_KEYS = (
    "temperature",
    "ce_weight",
    "lr",
    "loss",
    "beta",
    "lmbda",
    "op_loss",
    "op_temperature",
    "op_start_step",
)


def parse_variant(text: str) -> dict[str, Any]:
    """``temperature=2,ce_weight=0.5,lr=3e-4`` -> kd overrides (+ ``lr``); ``lmbda``, ``op_loss``,
    ``op_temperature`` and ``op_start_step`` go to ``kd.on_policy`` (its ``lmbda``, ``loss``, ``temperature``,
    ``start_step``)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in VARIANT_KEYS:
            raise SystemExit(f"--kd-variant: unknown key {key!r} ({', '.join(VARIANT_KEYS)})")
        if key in ("lmbda", "op_loss", "op_temperature", "op_start_step"):
            field = {"lmbda": "lmbda", "op_loss": "loss", "op_temperature": "temperature"}.get(key, "start_step")
            cast = {"op_loss": str, "op_start_step": int}.get(key, float)
            out.setdefault("on_policy", {})[field] = cast(value)
        else:
            out[key] = value if key == "loss" else float(value)
    return out


# ----------------------------------------------------------------------------------------------- running


class Tee(io.TextIOBase):
    """Echo what raydist prints (driver and forwarded worker lines) and keep it for parsing."""

    def __init__(self, stream):
        self.stream, self.buf = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.buf.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def run_stage(stage: str, tag: str, cfg: dict[str, Any], runs: Path) -> dict[str, Any]:
    """Run (or reuse) one raydist stage; return its manifest, timings and log."""
    from raydist.config.distill import DistillConfig
    from raydist.config.finetune import FinetuneConfig
    from raydist.config.loading import config_from_dict
    from raydist.core.artifact import read_manifest
    from raydist.distill.distill import run_distill
    from raydist.train.finetune import run_finetune

    name = f"{tag}-{config_hash(cfg)}"
    run_dir = runs / name
    full = {**cfg, "run": {"name": name, "output_dir": str(runs)}, "train": {**cfg["train"], "keep_checkpoints": 1}}
    reused = (run_dir / "artifact" / "raydist.json").is_file()
    log, wall, load0 = "", None, loadavg()
    if reused:
        say(f"{tag}: reusing the completed run {run_dir}")
    else:
        say(f"{tag}: starting run {run_dir} (load average {load0})")
        cls = DistillConfig if stage == "distill" else FinetuneConfig
        cfg_obj = config_from_dict(cls, full)
        tee = Tee(sys.stdout)
        t0 = time.time()
        with contextlib.redirect_stdout(tee):
            art = (run_distill if stage == "distill" else run_finetune)(cfg_obj)
        wall = time.time() - t0
        log = tee.buf.getvalue()
        if not (Path(art) / "raydist.json").is_file():
            raise SystemExit(f"{tag}: run finished without an artifact ({art})")
        for ckpt in run_dir.glob("checkpoint_*"):  # ~1 GB of DeepSpeed state each; the artifact is what counts
            shutil.rmtree(ckpt, ignore_errors=True)
    manifest = read_manifest(run_dir / "artifact")
    times, phases = step_records(run_dir)
    m = re.search(
        r"teacher cache: (\d+) sequences, (?:top-\d+|\d+ draws per token|last hidden states)[^\n]*?, in (\d+)s", log
    )
    return {
        "tag": tag,
        "run_dir": str(run_dir),
        "artifact": str(run_dir / "artifact"),
        "reused": reused,
        "wall_s": wall,
        "loadavg_at_start": load0,
        "manifest": manifest,
        "step_times": times,
        "step_phases": phases,
        "cache_build_s": float(m.group(2)) if m else None,
        "cache_rows": int(m.group(1)) if m else None,
        "cache_reused": "reusing teacher cache" in log,
    }


def cache_manifest_of(kd: dict[str, Any], out: Path) -> dict[str, Any]:
    """The ``cache.json`` of the teacher cache a run's kd settings point at (the work dir's default one unless
    ``cache_dir`` is set)."""
    return json.loads((Path(kd.get("cache_dir", out / "teacher_cache")) / "cache.json").read_text())


def step_records(run_dir: Path) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
    """Each step's record time, and rank 0's seconds per phase of it (data, forward, backward, optimizer) as
    the worker logs them, from one read of ``metrics.jsonl``."""
    from raydist.core.progress import read_history

    steps = [h for h in read_history(run_dir / "metrics.jsonl") if "tokens_per_s" in h]
    return {int(h["step"]): float(h["time"]) for h in steps}, {
        int(h["step"]): h["phase_s"] for h in steps if "phase_s" in h
    }


def median_phases(run: dict[str, Any]) -> Optional[dict[str, float]]:
    """The median of each phase over the steady steps (None for runs logged before phases were)."""
    phases = steady(run["step_phases"])
    if not phases:
        return None
    return {k: median_or_none(p[k] for p in phases.values()) for k in next(iter(phases.values()))}


def step_gaps(times: dict[int, float]) -> dict[int, float]:
    steps = sorted(times)
    return {b: times[b] - times[a] for a, b in zip(steps, steps[1:]) if b == a + 1}


def steady(gaps: dict[int, float]) -> dict[int, float]:
    return {s: g for s, g in gaps.items() if s > DROP_STEPS}


def median_or_none(xs) -> Optional[float]:
    xs = list(xs)
    return statistics.median(xs) if xs else None


# ----------------------------------------------------------------------------------------------- CPU time


def cpu_per_step(sampler: CpuSampler, times: dict[int, float]) -> dict[int, dict[str, float]]:
    """``{step: {"rank_cpu_s", "foreign_cores"}}`` for steps whose start and end the sampler covered.

    Why: the box is shared, and other people's jobs can multiply a step's wall time (the 1-min load average
    went from ~3 to ~45 during one run here). The training ranks' CPU seconds per step measure the work a
    step costs, almost independently of that contention; "foreign" cores (the box's busy time minus this
    benchmark's processes) say how contended each step was.
    """
    out = {}
    for s in sorted(times):
        if s - 1 not in times:
            continue
        w = sampler.window(times[s - 1], times[s], clamp=False)
        if w is None:
            continue
        gap = times[s] - times[s - 1]
        foreign = max(w.box_busy - w.own, 0.0) / gap if gap > 0 else 0.0
        out[s] = {"rank_cpu_s": w.procs.get(RANKS, 0.0), "foreign_cores": foreign}
    return out


def cache_comparison(online: dict[str, Any], cache: dict[str, Any], sampler: CpuSampler) -> dict[str, Any]:
    """Step time and work per step of a cache run against its online twin (same init, batches and order)."""
    on, ca = steady(step_gaps(online["step_times"])), steady(step_gaps(cache["step_times"]))
    paired = [on[s] / ca[s] for s in on if s in ca and ca[s] > 0]
    # The same comparison by the training ranks' CPU seconds per step: the work a step costs, nearly
    # independent of how busy other jobs kept the shared box (wall times are not).
    on_c = steady(cpu_per_step(sampler, online["step_times"]))
    ca_c = steady(cpu_per_step(sampler, cache["step_times"]))
    on_s, ca_s = median_or_none(on.values()), median_or_none(ca.values())
    on_cpu = median_or_none(c["rank_cpu_s"] for c in on_c.values())
    ca_cpu = median_or_none(c["rank_cpu_s"] for c in ca_c.values())
    return {
        "online_step_s": on_s,
        "cache_step_s": ca_s,
        "online_step_gaps": on,
        "cache_step_gaps": ca,
        "cache_speedup": on_s / ca_s if on_s and ca_s else None,
        "cache_speedup_paired": median_or_none(paired),
        "online_step_rank_cpu_s": on_cpu,
        "cache_step_rank_cpu_s": ca_cpu,
        "cache_speedup_cpu": on_cpu / ca_cpu if on_cpu and ca_cpu else None,
        "online_step_cpu": on_c,
        "cache_step_cpu": ca_c,
        "online_phase_s": median_phases(online),
        "cache_phase_s": median_phases(cache),
    }


def speedup_ceiling(teacher_params: int, student_params: int, kept_teacher_params: int = 0) -> float:
    """What dropping the teacher's forward can save on a compute-bound step (forward ~ 1/3 of fwd + bwd);
    ``kept_teacher_params``: what of the teacher the cached step still runs (a last_hidden cache: its output
    layer)."""
    return (teacher_params + 3 * student_params) / (3 * student_params + kept_teacher_params)


def teacher_head_params(teacher: Path) -> int:
    """Parameters of the teacher's output layer (vocabulary x hidden size), from its config."""
    c = json.loads((teacher / "config.json").read_text())
    return int(c["vocab_size"]) * int(c["hidden_size"])


# ----------------------------------------------------------------------------------------------- noise


def per_example_nll(artifacts: dict[str, str], eval_parquet: Path) -> dict[str, list[tuple[float, int]]]:
    """``{name: [(summed response-token NLL, target tokens) per eval sequence]}`` for each artifact, on the
    eval rows raydist tokenized (``<run>/data/eval.parquet``), with raydist's own ``sum_nll``."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from raydist.core.data import collate
    from raydist.core.evaluation import sum_nll

    rows = pq.read_table(eval_parquet, columns=["input_ids", "labels"]).to_pylist()
    out = {}
    for name, path in artifacts.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = [sum_nll(model, [collate([r], 0)], "cpu") for r in rows]
        del model
    return out


def paired_bootstrap(
    a: list[tuple[float, int]], b: list[tuple[float, int]], n: int = 4000, seed: int = 0
) -> dict[str, float]:
    """Perplexity ratio ppl(a) / ppl(b) on the eval set, with a 95 % interval from resampling the eval
    sequences (paired: both models are scored on the same resampled set) — the spread that comes from
    having only a couple of dozen short held-out answers, not from training noise."""
    import math
    import random

    rng = random.Random(seed)
    k = len(a)

    def ratio(idx) -> float:
        toks = sum(a[i][1] for i in idx)
        return math.exp((sum(a[i][0] for i in idx) - sum(b[i][0] for i in idx)) / toks) if toks else float("nan")

    draws = sorted(ratio([rng.randrange(k) for _ in range(k)]) for _ in range(n))
    return {
        "ratio": ratio(range(k)),
        "ci95_low": draws[int(0.025 * n)],
        "ci95_high": draws[int(0.975 * n) - 1],
        "p_ratio_below_1": sum(d < 1 for d in draws) / n,
    }


def generation_scores(
    artifacts: dict[str, str], eval_jsonl: Path, max_new_tokens: int, batch: int = 8
) -> dict[str, list[float]]:
    """``{name: [ROUGE-L F1 of the greedy answer against the reference, per held-out instance]}``: the prompt is
    rendered as raydist renders it in training (chat template of the artifact's tokenizer), the answer is
    raydist's ``generate_answers`` (left-padded batches, greedy), the score Google's ``rouge-score`` (stemmed)."""
    import torch
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydist.core.data import expand_instruction_records, instruction_to_messages, render_prompt
    from raydist.distill.generation import generate_answers

    records = expand_instruction_records(json.loads(x) for x in eval_jsonl.read_text().splitlines() if x.strip())
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out = {}
    for name, path in artifacts.items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompts = [render_prompt(tok, instruction_to_messages(r)[:1]) for r in records]
        answers: list[str] = []
        for i in range(0, len(prompts), batch):
            answers += generate_answers(
                model, tok, prompts[i : i + batch], max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=0
            )
        out[name] = [scorer.score(r["output"], a)["rougeL"].fmeasure for r, a in zip(records, answers)]
        del model
    return out


def bootstrap_mean(xs: list[float], n: int = 4000, seed: int = 0) -> dict[str, float]:
    """Mean of per-instance scores with a 95 % interval from resampling the instances."""
    rng = random.Random(seed)
    k = len(xs)
    draws = sorted(sum(xs[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return {"mean": sum(xs) / k, "ci95_low": draws[int(0.025 * n)], "ci95_high": draws[int(0.975 * n) - 1]}


def paired_difference(a: list[float], b: list[float], n: int = 4000, seed: int = 0) -> dict[str, float]:
    """mean(a) - mean(b) over the same instances, with a 95 % paired-bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired scores of different lengths: {len(a)} vs {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m = bootstrap_mean(d, n, seed)
    return {
        "diff": m["mean"],
        "ci95_low": m["ci95_low"],
        "ci95_high": m["ci95_high"],
        "above_zero": m["ci95_low"] > 0,
        **resolving_power(d),
    }


def resolving_power(d: list[float]) -> dict[str, Any]:
    """How far the eval is from deciding a paired difference: the per-instance standard deviation of ``d`` and
    the instances at which a normal 95 % interval of its mean would exclude 0, were the mean and spread the
    same: (1.96 · sd / |mean|)² (None for a zero mean)."""
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    return {"sd": sd, "instances_to_resolve": math.ceil((1.96 * sd / abs(mean)) ** 2) if mean else None}


def op_key(lmbda: float, start: int, protocol_start: int) -> str:
    """An on-policy run's name in the generation scores: ``onpolicy<λ>``, and ``-from<S>`` when it starts at
    another step than the protocol's runs (``--op-warm-start``)."""
    return f"onpolicy{lmbda:g}" + ("" if start == protocol_start else f"-from{start}")


def op_label(key: str) -> str:
    """``onpolicy1-from15`` → ``λ = 1, from step 16``."""
    lmbda, _, start = key[len("onpolicy") :].partition("-from")
    return f"λ = {lmbda}" + (f", from step {int(start) + 1}" if start else "")


def generation_results(scores: dict[str, list[float]], args) -> dict[str, Any]:
    """The results keys of the generation metric: each model's mean score and interval, and the paired
    differences that decide the on-policy goal (beat both CE and off-policy KD)."""
    means = {k: bootstrap_mean(v) for k, v in scores.items()}
    out: dict[str, Any] = {
        "generation": {
            "metric": "ROUGE-L F1 (rouge-score, stemmed) of the greedy answer vs the reference, mean over instances",
            "instances": len(scores["ce"]),
            "max_new_tokens": args.gen_max_new_tokens,
            "scores": means,
            "per_instance": scores,
        },
        "ce_gen_score": means["ce"]["mean"],
        "ce_gen_score_ci95": [means["ce"]["ci95_low"], means["ce"]["ci95_high"]],
        "offpolicy_gen_score": means["offpolicy"]["mean"],
        "offpolicy_gen_score_ci95": [means["offpolicy"]["ci95_low"], means["offpolicy"]["ci95_high"]],
    }
    full = "onpolicy1" if "onpolicy1" in scores else next((k for k in scores if k.startswith("onpolicy")), None)
    if full is not None:
        out.update(
            {
                "onpolicy_gen_run": full,
                "onpolicy_gen_score": means[full]["mean"],
                "onpolicy_gen_score_ci95": [means[full]["ci95_low"], means[full]["ci95_high"]],
                "onpolicy_vs_offpolicy_gen": paired_difference(scores[full], scores["offpolicy"]),
                "onpolicy_vs_ce_gen": paired_difference(scores[full], scores["ce"]),
            }
        )
        out["onpolicy_gen_goal_met"] = (
            out["onpolicy_vs_offpolicy_gen"]["diff"] > 0 and out["onpolicy_vs_ce_gen"]["diff"] > 0
        )
        out["generation"]["other_onpolicy"] = {  # the runs beside the one the goal is decided by
            k: {
                "vs_offpolicy": paired_difference(scores[k], scores["offpolicy"]),
                "vs_ce": paired_difference(scores[k], scores["ce"]),
            }
            for k in scores
            if k.startswith("onpolicy") and k != full
        }
    return out


# ----------------------------------------------------------------------------------------------- report


def metrics_of(run: dict[str, Any]) -> dict[str, Any]:
    return run["manifest"]["metrics"]


def student_summary(run: dict[str, Any], kd: dict[str, Any], lr: float, sampler: CpuSampler) -> dict[str, Any]:
    met = metrics_of(run)
    gaps = steady(step_gaps(run["step_times"]))
    cpu = steady(cpu_per_step(sampler, run["step_times"]))
    return {
        "eval_ppl": met.get("eval_ppl"),
        "pruned_before_training_ppl": met.get("pruned_before_training_ppl"),
        "teacher_ppl": met.get("teacher_ppl"),
        "gap_recovered": met.get("gap_recovered"),
        "train_loss": met.get("train_loss"),
        "tokens_per_s": met.get("tokens_per_s"),
        "median_step_s": median_or_none(gaps.values()),
        "median_step_rank_cpu_s": median_or_none(c["rank_cpu_s"] for c in cpu.values()),
        "mean_foreign_cores": statistics.mean(c["foreign_cores"] for c in cpu.values()) if cpu else None,
        "kd": kd,
        "lr": lr,
        "run_dir": run["run_dir"],
        "reused": run["reused"],
        "wall_s": run["wall_s"],
        "loadavg_at_start": run["loadavg_at_start"],
    }


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def ci(b: Optional[dict[str, float]], what: str = "") -> str:
    """`` (95 % CI 0.91-1.02)`` from a paired bootstrap, or nothing."""
    if not b:
        return ""
    return f" ({what + ' ' if what else ''}95 % CI {b['ci95_low']:.3f}-{b['ci95_high']:.3f} over eval sequences)"


def vs_ce_row(label: str, ppl: float, ce_ppl: float, boot: Optional[dict[str, float]]) -> tuple[str, str, str]:
    """A KD-like run's table row: its eval ppl and KD/CE ratio (with the bootstrap interval when there is one)."""
    return (label, fmt(ppl), f"KD/CE ppl = {fmt(ppl / ce_ppl, 3)}{ci(boot)}")


CACHE_KINDS = ("top_k", "sampled", "top_k_tail", "last_hidden")  # kd.cache_entries


def cache_label(entries: str, k: int, tail_draws: Optional[int] = None, head_dtype: Optional[str] = None) -> str:
    """How the tables name a teacher cache of any kind (``kd.cache_entries``; ``tail_draws`` from the cache's
    key, which names it for top_k_tail caches; ``head_dtype``: ``kd.cache_head_dtype`` of a last_hidden run)."""
    if entries == "top_k_tail":
        return f"the cache of the top {k - tail_draws} + {tail_draws} tail draws per token"
    if entries == "last_hidden":
        if head_dtype == "bfloat16":
            return "the cache of the teacher's last hidden states (its logits from a bfloat16 output layer)"
        return "the cache of the teacher's last hidden states (exact logits)"
    return f"the top-{k} cache" if entries == "top_k" else f"the cache of {k} teacher draws per token"


def small_cache_label(r: dict[str, Any], o: dict[str, Any]) -> str:
    """The label of a small-student cache run's cache (``big_teacher`` or one of its ``other_caches``)."""
    return cache_label(o["cache_entries"], r["settings"]["top_k"], o.get("tail_draws"), head_dtype_of(r))


def head_dtype_of(r: dict[str, Any]) -> Optional[str]:
    """``--cache-head-dtype`` of a results file (None: the training's precision, float32 here)."""
    return r["settings"].get("cache_head_dtype")


def table_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    ce_ppl = r["ce_student_ppl"]
    rows = [
        (
            "teacher (SmolLM2-135M-Instruct), uncorrected",
            fmt(r["teacher_ppl_uncorrected"]),
            f"{r['teacher_params']:,} params",
        ),
        ("teacher, corrected (LoRA fine-tune)", fmt(r["teacher_ppl"]), ""),
        (
            "pruned student before training",
            fmt(r["pruned_before_training_ppl"]),
            f"{r['student_params']:,} params ({r['student_param_fraction']:.0%} of teacher)",
        ),
        (f"student, CE only ({r['settings']['steps']} steps)", fmt(ce_ppl), ""),
        vs_ce_row(f"student, KD ({r['kd_label']})", r["kd_student_ppl"], ce_ppl, r.get("kd_vs_ce")),
    ]
    for v in r.get("kd_variants", []):
        rows.append(vs_ce_row(f"student, KD variant ({v['label']})", v["eval_ppl"], ce_ppl, v.get("vs_ce")))
    g = r.get("generation_student")
    gen_ce_ppl, who = ce_ppl, "student"
    if g and not g["same_as_headline"]:
        gen_ce_ppl, who = g["ce_ppl"], "generation student"
        rows += [
            (
                f"generation student (drops {g['drop_layers']} layers, keeps {g['mlp_keep']:.0%} of MLP)",
                fmt(g["pruned_before_training_ppl"]),
                f"{g['student_params']:,} params ({g['student_param_fraction']:.0%} of teacher), before training",
            ),
            (f"{who}, CE only", fmt(g["ce_ppl"]), ""),
            vs_ce_row(f"{who}, KD ({r['kd_label']})", g["kd_ppl"], g["ce_ppl"], g.get("kd_vs_ce")),
        ]
    for v in r.get("on_policy_runs", []):
        op = v["kd"]["on_policy"]
        start = f", from step {op['start_step'] + 1}" if op.get("start_step") else ""
        label = f"{who}, on-policy KD (λ = {v['lmbda']:g}, {op['loss']}{start})"
        rows.append(vs_ce_row(label, v["eval_ppl"], gen_ce_ppl, v.get("vs_ce")))
    if r.get("cache_speedup") is not None:
        label = cache_label(
            r.get("cache_entries", "top_k"), r["settings"]["top_k"], r.get("cache_tail_draws"), head_dtype_of(r)
        )
        rows += [
            (
                f"KD from {label}",
                fmt(r["cache_eval_ppl"]),
                f"vs online {fmt(r['online_eval_ppl'])}: {r['cache_vs_online_ppl_pct']:+.2f} %"
                f"{ci(r.get('cache_vs_online'), 'cache/online')}",
            ),
            (
                "step time online / cache (median)",
                f"{r['online_step_s']:.2f} s / {r['cache_step_s']:.2f} s",
                f"cache_speedup = {r['cache_speedup']:.2f}x (per-step median {r['cache_speedup_paired']:.2f}x); other "
                f"jobs used {fmt(r.get('online_foreign_cores'))} / {fmt(r.get('cache_foreign_cores'))} cores",
            ),
            (
                "ranks' CPU seconds per step online / cache",
                f"{fmt(r.get('online_step_rank_cpu_s'))} s / {fmt(r.get('cache_step_rank_cpu_s'))} s",
                f"speedup by work = {fmt(r.get('cache_speedup_cpu'))}x (parameter-count estimate "
                f"{r['cache_speedup_ceiling']:.2f}x)",
            ),
            ("cache build (one-off)", f"{fmt(r['cache_build_s'], 0)} s", ""),
        ]
    for o in r.get("other_cache_entries", []):
        label = cache_label(o["cache_entries"], r["settings"]["top_k"], o.get("tail_draws"), head_dtype_of(r))
        rows.append(
            (
                f"KD from {label}",
                fmt(o["eval_ppl"]),
                f"vs online {o['vs_online_ppl_pct']:+.2f} %; {o['payload_bytes_per_token']} B per token, "
                f"{fmt(o.get('disk_bytes_per_token'), 0)} B on disk",
            )
        )
    if r.get("cache_bytes_per_token") is not None:
        rows.append(
            (
                "cache size per token",
                f"{r['cache_bytes_per_token']} B",
                f"{fmt(r.get('cache_disk_bytes_per_token'), 0)} B on disk "
                f"({r.get('cache_precision')} log-probabilities)",
            )
        )
    bt = r.get("big_teacher")
    if bt:
        rows += [
            (
                f"small student, online KD ({bt['student_params']:,} params; teacher "
                f"{bt['teacher_over_student_params']:.1f}x)",
                fmt(bt["online_eval_ppl"]),
                "",
            ),
            (
                f"small student, KD from {small_cache_label(r, bt)}",
                fmt(bt["cache_eval_ppl"]),
                f"vs online {100 * r['cache_ppl_rel_diff']:+.2f} % (cache_ppl_rel_diff); "
                f"{bt['cache_bytes_per_token']} B per token",
            ),
            (
                f"small student, ZeRO-{bt.get('zero_stage', 2)}: step time online / cache (median)",
                f"{fmt(bt['online_step_s'])} s / {fmt(bt['cache_step_s'])} s",
                f"cache_speedup_big_teacher = {fmt(bt['cache_speedup'])}x (by the ranks' CPU seconds "
                f"{fmt(bt['cache_speedup_cpu'])}x; parameter-count estimate {bt['cache_speedup_ceiling']:.2f}x"
                + (
                    " without the teacher's output layer"
                    if bt.get("cache_entries") == "last_hidden" and not bt.get("cache_speedup_ceiling_counts_head")
                    else ""
                )
                + ")",
            ),
        ]
        for o in bt.get("other_caches", []):
            rows.append(
                (
                    f"small student, KD from {small_cache_label(r, o)}",
                    fmt(o["eval_ppl"]),
                    f"vs online {100 * o['cache_ppl_rel_diff']:+.2f} %; {o['cache_bytes_per_token']} B per token; "
                    f"step {fmt(o['cache_step_s'])} s ({fmt(o['cache_speedup'])}x)",
                )
            )
        for stage, o in (r.get("big_teacher_by_zero_stage") or {}).items():
            if int(stage) != bt.get("zero_stage", 2):
                rows.append(
                    (
                        f"small student, ZeRO-{stage}: step time online / cache (median)",
                        f"{fmt(o['online_step_s'])} s / {fmt(o['cache_step_s'])} s",
                        f"{fmt(o['cache_speedup'])}x (by CPU seconds {fmt(o['cache_speedup_cpu'])}x); eval ppl "
                        f"{fmt(o['online_eval_ppl'])} / {fmt(o['cache_eval_ppl'])}",
                    )
                )
    return rows


def print_table(rows) -> None:
    w0 = max(len(a) for a, _, _ in rows)
    w1 = max(len(b) for _, b, _ in rows)
    print()
    print(f"{'':{w0}}  {'eval ppl':>{w1}}  notes")
    for a, b, c in rows:
        print(f"{a:{w0}}  {b:>{w1}}  {c}")
    print()


def markdown_section(r: dict[str, Any]) -> str:
    s, v = r["settings"], versions_of(r)
    lines = [
        SECTION,
        "",
        f"Command: `{COMMAND}` (measured {r['measured_at']}, {r['runtime_s'] / 60:.1f} min wall in all; "
        f"results in `benchmarks/results/distill.json`). " + provenance_line(r.get("provenance")),
        "",
        f"Machine: {machine_line(machine_of(r))}; shared with other jobs (1-min load average "
        f"{r['loadavg_range'][0]}–{r['loadavg_range'][1]} at phase starts). "
        + ", ".join(f"{k} {v.get(k) or 'not installed'}" for k in ("torch", "ray", "deepspeed", "transformers"))
        + ".",
        "",
        "Protocol (issue 3): SmolLM2-135M-Instruct; `seed_tasks.jsonl` split into "
        f"{r['data']['train_tasks']} tasks ({r['data']['train_instances']} instances) for training and "
        f"{r['data']['eval_tasks']} held out ("
        + ("drawn at random with seed 0" if r["data"].get("split") == "random" else "the file's last ones")
        + f"); metric = response-token perplexity on the held-out tasks ({r['eval_tokens']} target tokens; "
        f"{r['data']['eval_classification_tasks']} of the {r['data']['eval_tasks']} eval tasks are classification "
        f"tasks with one- to few-word labels, against {r['data']['train_classification_tasks']} of the "
        f"{r['data']['train_tasks']} training tasks). The 95 % intervals "
        "below resample the eval sequences). Everything runs through `run_finetune` / "
        "`run_distill` on 2 Ray Train CPU workers, ZeRO-2, fp32, batch 4 (2 x micro 2), seq_len "
        f"{s['seq_len']}, and the figures are the artifacts' `raydist.json` metrics.",
        "",
        f"1. Teacher correction: LoRA r16/α32 on all projections, {s['teacher_steps']} steps, lr "
        f"{s['teacher_lr']:g} (warmup 3, cosine).",
        f"2. Student pruned from the corrected teacher inside `run_distill`: {s['drop_layers']} of 30 layers "
        f"dropped, {s['mlp_keep']:.0%} of MLP channels kept (activation-ranked, 8 calibration sequences) → "
        f"{r['student_params']:,} parameters, {r['student_param_fraction']:.0%} of the teacher's "
        f"{r['teacher_params']:,}.",
        f"3. Same pruned init, data order and {s['steps']} steps (lr {s['lr']:g}, warmup 3, cosine) for each "
        f"student: KD = {r['kd_label']}, online teacher; CE = `kd.ce_weight: 1.0` (plain cross-entropy "
        "through the same code "
        f"path{', run in cache mode so no teacher forward is wasted' if s['ce_mode'] == 'cache' else ''}).",
        f"4. Cache vs online: the KD run again with `kd.teacher_mode: cache` (top-{s['top_k']} + missing mass, "
        f"built by a {s['cache_actors']}-actor Ray Data job, {s['cache_batch_size']} sequence(s) per forward). Step "
        "time = gaps between consecutive step records in `metrics.jsonl`, "
        f"steps 1–{DROP_STEPS} dropped, median.",
    ]
    gs = r.get("generation_student")
    if gs and not gs["same_as_headline"]:
        lines.append(
            f"5. Generation comparison (CE, off-policy KD, on-policy KD): the same recipe from a student that can "
            f"already write answers: {gs['drop_layers']} layers dropped, {gs['mlp_keep']:.0%} of MLP channels kept "
            f"→ {gs['student_params']:,} parameters ({gs['student_param_fraction']:.0%}). From the headline "
            "student every method's greedy answers are repetitive babble (ROUGE-L 0.035–0.073 for CE, off- and "
            "on-policy KD at ffa9e0c), which the metric cannot rank."
        )
    lines += [
        "",
        *md_table(("model", "eval ppl", "notes"), table_rows(r), "lrl"),
    ]
    lines += [
        "",
        f"Peer reference on the same protocol (issue 3): uncorrected teacher {PEER['teacher_ppl_uncorrected']}, "
        f"25 %-MLP-pruned student {PEER['pruned_25pct_mlp_before']}, 30 CE steps → {PEER['ce_30_steps']} "
        "(a milder prune than ours).",
        "",
    ]
    b = r.get("kd_vs_ce")
    clear = b is not None and (b["ci95_high"] < 1 or b["ci95_low"] > 1)
    if not r["kd_beats_ce"]:
        head = "KD does **not** beat CE-only"
    elif b is None or clear:
        head = "KD beats CE-only"
    else:
        head = "KD ends below CE-only, but not by more than the eval's noise"
    verdict = (
        head + f": {fmt(r['kd_student_ppl'])} vs {fmt(r['ce_student_ppl'])} (KD/CE = "
        f"{fmt(r['kd_over_ce_ppl'], 3)}"
        + ("" if b is None else f", 95 % CI {b['ci95_low']:.3f}–{b['ci95_high']:.3f}")
        + ")."
    )
    if r.get("kd_variants"):
        verdict += (
            " Other KD settings tried (same init, data and steps; the headline setting was fixed first, and "
            "the best of several on this small eval is an optimistic estimate): "
            + "; ".join(
                f"{v['label']} → {fmt(v['eval_ppl'])}"
                + (
                    f" (KD/CE {v['vs_ce']['ratio']:.3f}, 95 % CI "
                    f"{v['vs_ce']['ci95_low']:.3f}–{v['vs_ce']['ci95_high']:.3f})"
                    if v.get("vs_ce")
                    else ""
                )
                for v in r["kd_variants"]
            )
            + "."
        )
    lines.append(verdict)
    if r.get("cache_speedup") is not None:
        goal_s = "meets" if r["cache_speedup"] >= 2 else "misses"
        goal_p = "within" if abs(r["cache_vs_online_ppl_pct"]) <= 1 else "outside"
        lines += [
            "",
            f"Cache: {r['cache_speedup']:.2f}x faster per step by wall time ({goal_s} the ≥ 2x goal; "
            f"{fmt(r.get('cache_speedup_cpu'))}x by the ranks' CPU seconds per step, which other jobs on the "
            f"box barely move — they used {fmt(r.get('online_foreign_cores'))} cores on average during the "
            f"online steps and {fmt(r.get('cache_foreign_cores'))} during the cached ones); eval ppl "
            f"{r['cache_vs_online_ppl_pct']:+.2f} % vs online ({goal_p} the 1 % goal); one-off build "
            f"{fmt(r['cache_build_s'], 0)} s for {fmt(r.get('cache_rows'))} sequences. On a CPU the step is "
            "compute-bound, so the cache can at most save the teacher's forward: with forward ≈ 1/3 of "
            f"forward + backward and compute proportional to parameters, that puts the speedup near (teacher + "
            f"3·student) / (3·student) = {r['cache_speedup_ceiling']:.2f}x for these parameter counts. The ≥ 2x "
            "goal needs a teacher "
            "several times the student's size (or a GPU step where the student is not the bottleneck). "
            + {
                "top_k": "The cache trains on a different objective (top-k plus one bucket for the missing mass, a "
                "lower bound of the full KL), so the two students differ by more than float noise.",
                "sampled": "The cache gives the full KL's gradient only in expectation over its draws, so the two "
                "students differ by more than float noise.",
                "top_k_tail": "The cache gives the full KL's gradient exactly on its top entries and in "
                "expectation over its tail draws, so the two students differ by more than float noise.",
                "last_hidden": "The cache gives the online teacher's logits (up to float16 storage of its hidden "
                "states"
                + (" and the bfloat16 output layer" if head_dtype_of(r) == "bfloat16" else "")
                + "), so the two students should differ by float noise only.",
            }[r.get("cache_entries", "top_k")],
        ]
    bt = r.get("big_teacher")
    if bt:
        goal_s = "meets" if (bt["cache_speedup"] or 0) >= 2 else "misses"
        exact = bt.get("cache_entries") == "last_hidden"
        goal_p = "within" if abs(r["cache_ppl_rel_diff"]) <= 0.01 else "outside"
        lines += [
            "",
            f"Cache with a teacher {bt['teacher_over_student_params']:.1f}x the student (where a cache is meant to "
            f"pay): the same KD run with a student of {bt['student_params']:,} parameters ({bt['drop_layers']} "
            f"layers dropped, {bt['mlp_keep']:.0%} of MLP channels kept), online and from the same cache, same "
            f"steps, DeepSpeed ZeRO-{bt.get('zero_stage', 2)}: {fmt(bt['cache_speedup'])}x per step by wall time "
            f"({goal_s} the ≥ 2x goal; "
            f"{fmt(bt['cache_speedup_cpu'])}x by CPU work; parameter-count estimate "
            f"{bt['cache_speedup_ceiling']:.2f}x"
            + (
                ""
                if bt.get("cache_speedup_ceiling_counts_head") or not exact
                else " without the teacher's output layer, which this cache still runs on every step"
            )
            + (
                ", which a student whose largest matrix is its tied embedding beats: on the input side that matrix "
                "is a table lookup, so the student computes less than its parameter count says"
                if bt["cache_speedup"] > bt["cache_speedup_ceiling"]
                else ""
            )
            + f"), eval ppl {100 * r['cache_ppl_rel_diff']:+.2f} % vs online ({goal_p} the 1 % goal"
            + (
                ": the same loss as online KD, up to the float16 storage of the hidden states"
                + (" and the bfloat16 output layer" if head_dtype_of(r) == "bfloat16" else "")
                if exact
                else f"; but a student this small does not learn the task in {s['steps']} steps — eval ppl "
                f"{fmt(bt['online_eval_ppl'])} against the teacher's {fmt(r['teacher_ppl'])} — so that difference "
                "says little about the cache"
                if bt["online_eval_ppl"] > 10 * r["teacher_ppl"]
                else ""
            )
            + f"). That cache, {small_cache_label(r, bt)}, costs "
            f"{bt['cache_bytes_per_token']} bytes per token "
            f"({fmt(bt['cache_disk_bytes_per_token'], 0)} on "
            "disk after Parquet's compression).",
        ]
        for o in bt.get("other_caches", []):
            lines[-1] += (
                f" From {small_cache_label(r, o)} ({o['cache_bytes_per_token']} bytes per token) the same student "
                f"ends {100 * o['cache_ppl_rel_diff']:+.2f} % vs online, at {fmt(o['cache_speedup'])}x per step."
            )
        on_p, ca_p = bt.get("online_phase_s"), bt.get("cache_phase_s")
        if on_p and ca_p:
            kept = ca_p["backward"] + ca_p["optimizer"]
            lines[-1] += (
                " Where rank 0's step goes (medians, `phase_s` in `metrics.jsonl`): online "
                + ", ".join(f"{k} {on_p[k]:.2f} s" for k in ("forward", "backward", "optimizer"))
                + "; from the cache "
                + ", ".join(f"{k} {ca_p[k]:.2f} s" for k in ("forward", "backward", "optimizer"))
                + ". The cache removes the teacher's forward"
                + (" (all but its output layer)" if exact else "")
                + "; the student's backward (with the gradient "
                f"reduction over the ranks) and DeepSpeed's optimizer step stay, {kept:.2f} s or "
                f"{kept / max(sum(ca_p.values()), 1e-9):.0%} of the cached step: with a 49K-token tied embedding "
                "as most of a ~30M student, those do not shrink with the student's depth."
            )
        others = [o for k, o in (r.get("big_teacher_by_zero_stage") or {}).items() if int(k) != bt.get("zero_stage", 2)]
        for o in others:
            lines[-1] += (
                f" With ZeRO-{o['zero_stage']}"
                + (
                    " (the protocol's stage, which shards optimizer state and gradients a ~30M student does not "
                    "need sharded)"
                    if o["zero_stage"] == 2
                    else ""
                )
                + f": {fmt(o['cache_speedup'])}x "
                f"({fmt(o['online_step_s'])} s / {fmt(o['cache_step_s'])} s per step)."
            )
    if r.get("generation"):
        lines += ["", *generation_markdown(r)]
    if r.get("notes"):
        lines += [""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def generation_markdown(r: dict[str, Any]) -> list[str]:
    """The generation-metric table and its verdict (on-policy KD against off-policy KD and CE)."""
    g = r["generation"]
    gs = r.get("generation_student")
    who = "generation student" if gs and not gs["same_as_headline"] else "student"
    names = {"teacher": "teacher, corrected", "ce": f"{who}, CE only", "offpolicy": f"{who}, KD ({r['kd_label']})"}
    rows = []
    for k, m in g["scores"].items():
        label = names.get(k) or f"{who}, on-policy KD ({op_label(k)})"
        rows.append((label, f"{m['mean']:.3f}", f"95 % CI {m['ci95_low']:.3f}–{m['ci95_high']:.3f}"))
    lines = [
        f"Generation metric: {g['metric']}, {g['instances']} held-out instances, greedy, up to "
        f"{g['max_new_tokens']} new tokens (higher is better).",
        "",
        *md_table(("model", "ROUGE-L F1", "interval over instances"), rows, "lrl"),
    ]
    if r.get("onpolicy_gen_score") is not None:
        a, b = r["onpolicy_vs_offpolicy_gen"], r["onpolicy_vs_ce_gen"]
        lines += [
            "",
            f"On-policy KD ({r['onpolicy_gen_run']}) − off-policy KD: {a['diff']:+.3f} (95 % CI "
            f"{a['ci95_low']:+.3f} to {a['ci95_high']:+.3f}); − CE: {b['diff']:+.3f} ({b['ci95_low']:+.3f} to "
            f"{b['ci95_high']:+.3f}). Goal (beat both on this metric): "
            + ("met" if r["onpolicy_gen_goal_met"] else "**not met**")
            + ("" if a["above_zero"] and b["above_zero"] else " (not beyond the eval's noise)")
            + ".",
        ]
        per = g["per_instance"]
        power = {
            what: resolving_power([x - y for x, y in zip(per[r["onpolicy_gen_run"]], per[other])])
            for what, other in (("off-policy KD", "offpolicy"), ("CE", "ce"))
        }
        lines[-1] += " How far these instances are from deciding it: " + "; ".join(
            f"against {what} the per-instance differences spread with SD {p['sd']:.3f}, so a 95 % interval "
            + (
                f"would settle the sign of this mean difference only from about {p['instances_to_resolve']:,} instances"
                if p["instances_to_resolve"]
                else "cannot exclude 0 at a zero mean difference"
            )
            for what, p in power.items()
        )
        lines[-1] += (
            f" (the seed tasks hold {r['data']['train_instances'] + r['data']['eval_instances']} instances in all, "
            "so even cross-validated folds over every task cannot settle a difference this small)."
        )
        for k, o in g.get("other_onpolicy", {}).items():
            a2, b2 = o["vs_offpolicy"], o["vs_ce"]
            lines[-1] += (
                f" On-policy KD ({op_label(k)}) − off-policy KD: {a2['diff']:+.3f} ({a2['ci95_low']:+.3f} to "
                f"{a2['ci95_high']:+.3f}); − CE: {b2['diff']:+.3f} ({b2['ci95_low']:+.3f} to {b2['ci95_high']:+.3f})."
            )
    return lines


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="work directory (kept); default: a fresh temp dir, removed at the end")
    ap.add_argument("--seed-tasks", type=Path, default=SEED_TASKS)
    ap.add_argument(
        "--split",
        choices=("random", "tail"),
        default="random",
        help="held-out tasks: 25 drawn at random (seed 0), or the file's last 25 (all classification)",
    )
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of every student (and the teacher)")
    ap.add_argument("--teacher-steps", type=int, help="teacher-correction steps (default: --steps)")
    ap.add_argument("--teacher-lr", type=float, default=3e-4)
    ap.add_argument("--lr", type=float, default=2e-4, help="students' peak learning rate")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--drop-layers", type=int, default=10)
    ap.add_argument("--mlp-keep", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ce-weight", type=float, default=0.0, help="CE share of the headline KD run's loss")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument(
        "--cache-entries",
        choices=CACHE_KINDS,
        default="top_k",
        help="what the KD-from-cache runs' cache keeps (kd.cache_entries): the top --top-k, --top-k draws, or "
        "the top --top-k minus --cache-tail-draws plus that many draws from the tail",
    )
    ap.add_argument(
        "--also-cache-entries",
        choices=CACHE_KINDS,
        action="append",
        help="one more KD-from-cache run (quality and cache size only) per kind; repeatable; default: the kinds "
        "--cache-entries is not; --no-variants drops them",
    )
    ap.add_argument(
        "--cache-tail-draws", type=int, default=None, help="kd.cache_tail_draws of top_k_tail caches (default k/2)"
    )
    ap.add_argument(
        "--cache-head-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="kd.cache_head_dtype of every last_hidden cache run (default: the training's precision, float32)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--kd-variant",
        action="append",
        metavar="K=V,...",
        help="extra online KD run, e.g. temperature=2,ce_weight=0.5 (keys: temperature, ce_weight, lr, "
        f"loss, beta); repeatable; default: {' and '.join(DEFAULT_VARIANTS)}",
    )
    ap.add_argument("--no-variants", action="store_true", help="no extra KD runs")
    ap.add_argument("--skip-on-policy", action="store_true", help="no on-policy KD runs")
    ap.add_argument(
        "--on-policy-lmbda",
        type=float,
        action="append",
        help="on-policy fraction of one on-policy KD run; repeatable; default: 1 and 0.5",
    )
    ap.add_argument("--op-max-new-tokens", type=int, default=64, help="tokens the student samples per prompt")
    ap.add_argument("--op-temperature", type=float, default=1.0, help="the student's sampling temperature")
    ap.add_argument("--op-loss", default="reverse_kl", choices=("reverse_kl", "jsd", "forward_kl"))
    ap.add_argument(
        "--op-start-step",
        type=int,
        default=0,
        help="steps of off-policy KD before the on-policy batches begin (kd.on_policy.start_step), within --steps",
    )
    ap.add_argument(
        "--op-warm-start",
        type=int,
        default=None,
        metavar="S",
        help="one more on-policy KD run: lambda 1 after S steps of off-policy KD (recorded beside the others)",
    )
    ap.add_argument("--skip-generation", action="store_true", help="no generation metric (greedy answers, ROUGE-L)")
    ap.add_argument(
        "--gen-drop-layers",
        type=int,
        default=4,
        help="layers the student of the generation comparison (CE, off-policy and on-policy KD) drops",
    )
    ap.add_argument("--gen-mlp-keep", type=float, default=1.0, help="MLP channels that student keeps")
    ap.add_argument("--gen-max-new-tokens", type=int, default=64, help="tokens per greedy answer")
    ap.add_argument("--reuse-teacher", type=Path, help="a corrected-teacher artifact dir from an earlier run")
    ap.add_argument(
        "--skip-cache",
        action="store_true",
        help="no KD-from-cache run (the CE student still trains in cache mode unless --ce-online)",
    )
    ap.add_argument("--ce-online", action="store_true", help="run the CE student with the online teacher")
    ap.add_argument("--skip-big-teacher", action="store_true", help="no cache-vs-online pair with the small student")
    ap.add_argument("--small-drop-layers", type=int, default=28, help="layers the small student drops")
    ap.add_argument("--small-mlp-keep", type=float, default=0.5, help="MLP channels the small student keeps")
    ap.add_argument(
        "--small-cache-entries",
        choices=CACHE_KINDS,
        action="append",
        help="cache kind of one KD-from-cache run of the small student (per --small-zero-stage); repeatable; "
        "default: --cache-entries; the goal figures are the first kind's",
    )
    ap.add_argument(
        "--small-zero-stage",
        type=int,
        action="append",
        choices=(0, 1, 2, 3),
        help="ZeRO stage of one cache-vs-online pair with the small student; repeatable; default: 2 (the "
        "protocol's) and 0 (a ~30M student has nothing to shard); the goal figures are the lowest stage's",
    )
    ap.add_argument("--skip-bootstrap", action="store_true", help="no per-sequence rescoring / intervals")
    ap.add_argument("--no-write", action="store_true", help="print only; leave the results files alone")
    ap.add_argument(
        "--results-name",
        default=RESULTS.stem,
        help=f"write benchmarks/results/<name>.json (default {RESULTS.stem}); only {RESULTS.name} rewrites "
        "BENCHMARKS.md (a side run, e.g. one more on-policy run reusing an --out, goes to a file of its own)",
    )
    ap.add_argument(
        "--markdown-only",
        action="store_true",
        help=f"rewrite the {SECTION[3:]} section of BENCHMARKS.md from {RESULTS.name} without measuring",
    )
    args = ap.parse_args()
    if args.markdown_only:
        replace_section(markdown_section(json.loads(RESULTS.read_text())))
        say(f"rewrote the {SECTION[3:]} section of {BENCHMARKS_MD.name} from {RESULTS.relative_to(REPO)}")
        return
    args.teacher_steps = args.teacher_steps or args.steps
    args.small_zero_stage = sorted(set(args.small_zero_stage or [2, 0]))
    args.small_cache_entries = list(dict.fromkeys(args.small_cache_entries or [args.cache_entries]))
    other_kinds = [kind for kind in CACHE_KINDS if kind != args.cache_entries]
    args.also_cache_entries = args.also_cache_entries or ([] if args.no_variants else other_kinds)
    args.kd_variant = [] if args.no_variants else (args.kd_variant or list(DEFAULT_VARIANTS))
    args.on_policy_lmbda = [] if args.skip_on_policy else (args.on_policy_lmbda or [1.0, 0.5])

    t_start = time.time()
    measured = provenance()  # before the run: the code that is measured is the code at the start
    out = (args.out or Path(tempfile.mkdtemp(prefix="raydist-bench-distill-"))).resolve()
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    say(f"work dir {out}")
    train, evals, data_info = split_seed_tasks(args.seed_tasks.resolve(), out, args.split)
    notes: list[str] = []

    sampler = CpuSampler(period_s=1.0, thread_category=None).__enter__()
    try:
        # 1. teacher correction
        if args.reuse_teacher:
            teacher = args.reuse_teacher.resolve()
            from raydist.core.artifact import read_manifest

            t_manifest = read_manifest(teacher)
            teacher_run = None
            notes.append(f"teacher reused from {teacher}")
        else:
            teacher_run = run_stage("finetune", "teacher", teacher_config(args, train, evals), runs)
            teacher, t_manifest = Path(teacher_run["artifact"]), teacher_run["manifest"]
        teacher_uncorrected = t_manifest["metrics"].get("eval_ppl_before")

        # 2. students: KD (online) first, then its cache twin right after (comparable load), then CE
        kd_main = {"loss": "forward_kl", "temperature": args.temperature, "ce_weight": args.ce_weight}
        kd_run = run_stage(
            "distill", "kd", student_config(args, teacher, train, evals, out, kd=kd_main, lr=args.lr), runs
        )
        cache_run = None

        def cached_kd(entries: str) -> dict[str, Any]:
            """A KD-from-cache run's kd settings; a cache of draws lives in its own directory (its key differs)."""
            if entries == "top_k":
                return {**kd_main, "teacher_mode": "cache"}
            cache_dir = str(out / f"teacher_cache_{entries}")
            kd = {**kd_main, "teacher_mode": "cache", "cache_entries": entries, "cache_dir": cache_dir}
            if entries == "last_hidden" and args.cache_head_dtype:
                kd["cache_head_dtype"] = args.cache_head_dtype
            if entries == "top_k_tail" and args.cache_tail_draws is not None:
                kd["cache_tail_draws"] = args.cache_tail_draws
                kd["cache_dir"] = f"{cache_dir}_{args.cache_tail_draws}"
            return kd

        kd_cached = cached_kd(args.cache_entries)
        other_caches = []  # the same KD run from a cache of the other kind(s): quality and size only
        if not args.skip_cache:
            cache_run = run_stage(
                "distill",
                "kd-cache",
                student_config(args, teacher, train, evals, out, kd=kd_cached, lr=args.lr),
                runs,
            )
        # the cache where it is meant to pay: a teacher >= 4x the student, same steps; per ZeRO stage the online run
        # and one cache run per --small-cache-entries kind (the first one's are the goal figures)
        small_runs: dict[int, tuple[dict[str, Any], list[tuple[str, dict[str, Any], dict[str, Any]]]]] = {}
        small_shape = (args.small_drop_layers, args.small_mlp_keep)
        if cache_run is not None and not args.skip_big_teacher:
            for stage in args.small_zero_stage:
                suffix = "" if stage == 2 else f"-z{stage}"

                def small(tag: str, kd: dict[str, Any]) -> dict[str, Any]:
                    cfg = student_config(
                        args, teacher, train, evals, out, kd=kd, lr=args.lr, shape=small_shape, zero_stage=stage
                    )
                    return run_stage("distill", tag + suffix, cfg, runs)

                online_small = small("kd-small", kd_main)
                caches = []
                for entries in args.small_cache_entries:
                    kd = cached_kd(entries)
                    tag = "kd-small-cache" if entries == args.cache_entries else f"kd-small-cache-{entries}"
                    caches.append((entries, kd, small(tag, kd)))
                small_runs[stage] = (online_small, caches)
        for entries in args.also_cache_entries if cache_run is not None else []:
            kd_other = cached_kd(entries)
            run = run_stage(
                "distill",
                f"kd-cache-{entries}",
                student_config(args, teacher, train, evals, out, kd=kd_other, lr=args.lr),
                runs,
            )
            manifest = cache_manifest_of(kd_other, out)
            other_caches.append(
                {
                    "cache_entries": entries,
                    "tail_draws": manifest["key"].get("tail_draws"),
                    "eval_ppl": metrics_of(run)["eval_ppl"],
                    "vs_online_ppl_pct": 100 * (metrics_of(run)["eval_ppl"] / metrics_of(kd_run)["eval_ppl"] - 1),
                    "payload_bytes_per_token": manifest.get("payload_bytes_per_token"),
                    "disk_bytes_per_token": manifest.get("disk_bytes_per_token"),
                    "cache_build_s": run["cache_build_s"],
                    "run": student_summary(run, kd_other, args.lr, sampler),
                }
            )
        ce_mode = "online" if args.ce_online else "cache"
        ce_kd = {**kd_main, "ce_weight": 1.0, "teacher_mode": ce_mode}
        ce_run = run_stage(
            "distill", "ce", student_config(args, teacher, train, evals, out, kd=ce_kd, lr=args.lr), runs
        )
        variants = []
        for i, text in enumerate(args.kd_variant):
            v = parse_variant(text)
            lr = float(v.pop("lr", args.lr))
            kd = {**kd_main, **v}
            run = run_stage(
                "distill", f"kd-var{i}", student_config(args, teacher, train, evals, out, kd=kd, lr=lr), runs
            )
            variants.append({"label": text, **student_summary(run, kd, lr, sampler)})
        # The generation comparison (CE, off-policy KD, on-policy KD at each --on-policy-lmbda) trains a student
        # that can already write answers; the headline student's own when the shapes are the same.
        gen_shape = (args.gen_drop_layers, args.gen_mlp_keep)
        same_student = gen_shape == (args.drop_layers, args.mlp_keep)
        gen_kd = gen_ce = None
        if args.on_policy_lmbda or not args.skip_generation:
            if same_student:
                gen_kd, gen_ce = kd_run, ce_run
            else:
                gen_kd, gen_ce = (
                    run_stage(
                        "distill",
                        tag,
                        student_config(args, teacher, train, evals, out, kd=kd, lr=args.lr, shape=gen_shape),
                        runs,
                    )
                    for tag, kd in (("gen-kd", kd_main), ("gen-ce", ce_kd))
                )
        on_policy = []  # the generation student's KD run with kd.on_policy at each --on-policy-lmbda (+ warm start)
        schedule = [(lmbda, args.op_start_step) for lmbda in args.on_policy_lmbda]
        if args.op_warm_start is not None and args.on_policy_lmbda:
            schedule.append((1.0, args.op_warm_start))
        for lmbda, start in schedule:
            op = {
                "lmbda": lmbda,
                "max_new_tokens": args.op_max_new_tokens,
                "temperature": args.op_temperature,
                "loss": args.op_loss,
                "start_step": start,
            }
            kd = {**kd_main, "on_policy": op}
            key = op_key(lmbda, start, args.op_start_step)
            run = run_stage(
                "distill",
                f"{'kd' if same_student else 'gen'}-{key}",
                student_config(args, teacher, train, evals, out, kd=kd, lr=args.lr, shape=gen_shape),
                runs,
            )
            on_policy.append({"lmbda": lmbda, "key": key, **student_summary(run, kd, args.lr, sampler)})
    finally:
        sampler.__exit__()
        import ray

        if ray.is_initialized():
            ray.shutdown()

    # ------------------------------------------------------------------------------- results
    kd_m, ce_m = metrics_of(kd_run), metrics_of(ce_run)
    student_params = kd_run["manifest"]["num_parameters"]
    teacher_params = t_manifest["num_parameters"]
    kd_label = f"forward KL, T={args.temperature:g}" + (f", CE weight {args.ce_weight:g}" if args.ce_weight else "")
    r: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M", time.localtime()),
        "command": COMMAND + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:])),
        "provenance": measured,
        "data": data_info,
        "eval_tokens": None,
        "kd_student_ppl": kd_m["eval_ppl"],
        "ce_student_ppl": ce_m["eval_ppl"],
        "teacher_ppl": kd_m["teacher_ppl"],
        "teacher_ppl_uncorrected": teacher_uncorrected,
        "teacher_ppl_from_finetune": t_manifest["metrics"].get("eval_ppl"),
        "pruned_before_training_ppl": kd_m["pruned_before_training_ppl"],
        "kd_over_ce_ppl": kd_m["eval_ppl"] / ce_m["eval_ppl"],
        "kd_beats_ce": kd_m["eval_ppl"] < ce_m["eval_ppl"],
        "kd_gap_recovered": kd_m.get("gap_recovered"),
        "ce_gap_recovered": ce_m.get("gap_recovered"),
        "student_params": student_params,
        "teacher_params": teacher_params,
        "student_param_fraction": student_params / teacher_params,
        "student_shape": kd_run["manifest"].get("student", {}).get("after"),
        "kd_label": kd_label,
        "kd": student_summary(kd_run, kd_main, args.lr, sampler),
        "ce": student_summary(ce_run, ce_kd, args.lr, sampler),
        "kd_variants": variants,
        "generation_student": None
        if gen_kd is None
        else {
            "drop_layers": args.gen_drop_layers,
            "mlp_keep": args.gen_mlp_keep,
            "same_as_headline": same_student,
            "student_params": gen_kd["manifest"]["num_parameters"],
            "student_param_fraction": gen_kd["manifest"]["num_parameters"] / teacher_params,
            "pruned_before_training_ppl": metrics_of(gen_kd)["pruned_before_training_ppl"],
            "kd_ppl": metrics_of(gen_kd)["eval_ppl"],
            "ce_ppl": metrics_of(gen_ce)["eval_ppl"],
            "kd": student_summary(gen_kd, kd_main, args.lr, sampler),
            "ce": student_summary(gen_ce, ce_kd, args.lr, sampler),
        },
        "on_policy_runs": on_policy,
        "teacher": None
        if teacher_run is None
        else {
            "run_dir": teacher_run["run_dir"],
            "reused": teacher_run["reused"],
            "wall_s": teacher_run["wall_s"],
            "metrics": t_manifest["metrics"],
        },
        "settings": {
            "steps": args.steps,
            "teacher_steps": args.teacher_steps,
            "teacher_lr": args.teacher_lr,
            "lr": args.lr,
            "seq_len": args.seq_len,
            "batch": "2 workers x micro 2",
            "zero_stage": 2,
            "drop_layers": args.drop_layers,
            "mlp_keep": args.mlp_keep,
            "temperature": args.temperature,
            "ce_weight": args.ce_weight,
            "top_k": args.top_k,
            "cache_entries": args.cache_entries,
            "cache_head_dtype": args.cache_head_dtype,
            "seed": args.seed,
            "ce_mode": ce_mode,
            "cache_actors": CACHE_ACTORS,
            "cache_batch_size": CACHE_BATCH,
            "step_time_drop_first": DROP_STEPS,
        },
        "peer_reference": PEER,
        "notes": notes,
    }
    # eval token count: the first eval record of any student run (the same eval file for all)
    from raydist.core.progress import read_history

    ev = [h for h in read_history(Path(kd_run["run_dir"]) / "metrics.jsonl") if "eval_tokens" in h]
    r["eval_tokens"] = ev[0]["eval_tokens"] if ev else None
    if cache_run is not None:
        c_m = metrics_of(cache_run)
        r.update(cache_comparison(kd_run, cache_run, sampler))
        r.update(
            {
                "online_eval_ppl": kd_m["eval_ppl"],
                "cache_eval_ppl": c_m["eval_ppl"],
                "cache_build_s": cache_run["cache_build_s"],
                "cache_run": student_summary(cache_run, kd_cached, args.lr, sampler),
            }
        )
        r["online_foreign_cores"] = r["kd"]["mean_foreign_cores"]
        r["cache_foreign_cores"] = r["cache_run"]["mean_foreign_cores"]
        r["cache_speedup_ceiling"] = speedup_ceiling(teacher_params, student_params)
        r["cache_rows"] = cache_run["cache_rows"]
        cache_manifest = cache_manifest_of(kd_cached, out)
        r["cache_entries"] = cache_manifest["key"].get("entries", "top_k")
        r["cache_tail_draws"] = cache_manifest["key"].get("tail_draws")
        r["cache_bytes_per_token"] = cache_manifest.get("payload_bytes_per_token")
        r["cache_disk_bytes_per_token"] = cache_manifest.get("disk_bytes_per_token")
        r["cache_precision"] = cache_manifest["key"].get("precision")
        r["cache_vs_online_ppl_pct"] = 100 * (c_m["eval_ppl"] / kd_m["eval_ppl"] - 1)
        r["other_cache_entries"] = other_caches
        if cache_run["cache_reused"] or cache_run["reused"]:
            notes.append("the teacher cache was reused from an earlier run (build time not measured now)")
    by_stage = {}
    for stage, (online_s, caches) in small_runs.items():
        small_params = online_s["manifest"]["num_parameters"]
        on_ppl = metrics_of(online_s)["eval_ppl"]

        def small_cache(entries: str, kd: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
            """What a small-student cache run adds to the online one: its cache and how it compares."""
            manifest = cache_manifest_of(kd, out)
            return {
                "cache_entries": entries,
                "tail_draws": manifest["key"].get("tail_draws"),
                "cache_bytes_per_token": manifest.get("payload_bytes_per_token"),
                "cache_disk_bytes_per_token": manifest.get("disk_bytes_per_token"),
                "cache_ppl_rel_diff": metrics_of(run)["eval_ppl"] / on_ppl - 1,
                **cache_comparison(online_s, run, sampler),
                "cache_run": student_summary(run, kd, args.lr, sampler),
            }

        (entries_s, kd_s, cache_s), rest = caches[0], caches[1:]
        by_stage[stage] = {
            "zero_stage": stage,
            "student_params": small_params,
            "teacher_over_student_params": teacher_params / small_params,
            "student_shape": online_s["manifest"].get("student", {}).get("after"),
            "drop_layers": args.small_drop_layers,
            "mlp_keep": args.small_mlp_keep,
            "online_eval_ppl": on_ppl,
            "cache_eval_ppl": metrics_of(cache_s)["eval_ppl"],
            "cache_speedup_ceiling": speedup_ceiling(
                teacher_params, small_params, teacher_head_params(teacher) if entries_s == "last_hidden" else 0
            ),
            "cache_speedup_ceiling_counts_head": entries_s == "last_hidden",
            "online_run": student_summary(online_s, kd_main, args.lr, sampler),
            **small_cache(entries_s, kd_s, cache_s),
            "other_caches": [
                {"eval_ppl": metrics_of(run)["eval_ppl"], **small_cache(entries, kd, run)} for entries, kd, run in rest
            ],
        }
    if by_stage:  # the goal figures: the lowest stage asked for (ZeRO-0 by default: nothing to shard at ~30M)
        bt = r["big_teacher"] = by_stage[min(by_stage)]
        r["big_teacher_by_zero_stage"] = {str(k): v for k, v in sorted(by_stage.items())}
        r["cache_speedup_big_teacher"] = bt["cache_speedup"]
        r["cache_speedup_big_teacher_cpu"] = bt["cache_speedup_cpu"]
        r["cache_ppl_rel_diff"] = bt["cache_ppl_rel_diff"]
        r["cache_bytes_per_token_big_teacher"] = bt["cache_bytes_per_token"]
    # eval-set noise: per-sequence NLLs of every model, paired bootstrap of the ratios that matter
    if not args.skip_bootstrap:
        import math

        say("scoring every artifact per eval sequence (for the bootstrap intervals)")
        arts = {"teacher": str(teacher), "kd": kd_run["artifact"], "ce": ce_run["artifact"]}
        if cache_run is not None:
            arts["cache"] = cache_run["artifact"]
        arts.update({f"var{i}": v["run_dir"] + "/artifact" for i, v in enumerate(variants)})
        if gen_kd is not None and not same_student:
            arts.update({"gen_kd": gen_kd["artifact"], "gen_ce": gen_ce["artifact"]})
        arts.update({f"op{i}": v["run_dir"] + "/artifact" for i, v in enumerate(on_policy)})
        nll = per_example_nll(arts, Path(kd_run["run_dir"]) / "data" / "eval.parquet")
        ppl = {k: math.exp(sum(x for x, _ in v) / sum(n for _, n in v)) for k, v in nll.items()}
        manifest_ppl = {
            "teacher": r["teacher_ppl"],
            "kd": r["kd_student_ppl"],
            "ce": r["ce_student_ppl"],
            **({"cache": r["cache_eval_ppl"]} if cache_run is not None else {}),
            **{f"var{i}": v["eval_ppl"] for i, v in enumerate(variants)},
            **{f"op{i}": v["eval_ppl"] for i, v in enumerate(on_policy)},
            **(
                {"gen_kd": r["generation_student"]["kd_ppl"], "gen_ce": r["generation_student"]["ce_ppl"]}
                if "gen_kd" in arts
                else {}
            ),
        }
        r["rescored_ppl"] = ppl
        r["rescored_max_rel_diff"] = max(abs(ppl[k] / manifest_ppl[k] - 1) for k in ppl)
        r["kd_vs_ce"] = paired_bootstrap(nll["kd"], nll["ce"])
        if cache_run is not None:
            r["cache_vs_online"] = paired_bootstrap(nll["cache"], nll["kd"])
        for i, v in enumerate(variants):
            v["vs_ce"] = paired_bootstrap(nll[f"var{i}"], nll["ce"])
        gen_ce_key = "gen_ce" if "gen_ce" in nll else "ce"
        if "gen_kd" in nll:
            r["generation_student"]["kd_vs_ce"] = paired_bootstrap(nll["gen_kd"], nll["gen_ce"])
        for i, v in enumerate(on_policy):
            v["vs_ce"] = paired_bootstrap(nll[f"op{i}"], nll[gen_ce_key])
    if not args.skip_generation:
        say("greedy answers of every model on the held-out instances (generation metric)")
        gen_arts = {"teacher": str(teacher), "ce": gen_ce["artifact"], "offpolicy": gen_kd["artifact"]}
        gen_arts.update({v["key"]: v["run_dir"] + "/artifact" for v in on_policy})
        r.update(generation_results(generation_scores(gen_arts, evals, args.gen_max_new_tokens), args))
    loads = [
        x
        for x in [
            teacher_run and teacher_run["loadavg_at_start"],
            kd_run["loadavg_at_start"],
            cache_run and cache_run["loadavg_at_start"],
            *[x["loadavg_at_start"] for on, caches in small_runs.values() for x in (on, *(c[2] for c in caches))],
            ce_run["loadavg_at_start"],
            *[v["loadavg_at_start"] for v in variants],
            *[v["loadavg_at_start"] for v in on_policy],
            *[x["loadavg_at_start"] for x in ((gen_kd, gen_ce) if gen_kd and not same_student else ())],
        ]
        if x is not None
    ]
    r["loadavg_range"] = [min(loads), max(loads)] if loads else [None, None]
    if any(
        x["reused"]
        for x in [kd_run, ce_run] + ([cache_run] if cache_run else []) + ([teacher_run] if teacher_run else [])
    ):
        notes.append("some runs were reused from an earlier invocation with the same --out (see *.reused)")
    r["runtime_s"] = time.time() - t_start

    rows = table_rows(r)
    print_table(rows)
    say(f"runtime {r['runtime_s'] / 60:.1f} min; work dir {out}")
    if not args.no_write:
        target = RESULTS.with_name(f"{args.results_name}.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(r, indent=2, default=str) + "\n")
        if target == RESULTS:
            replace_section(markdown_section(r))
        say(f"wrote {target}" + (f" and the {SECTION[3:]} section of {BENCHMARKS_MD}" if target == RESULTS else ""))
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
