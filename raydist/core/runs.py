"""Driver-side pieces every Ray stage shares: Ray start-up, run directories, tokenized data on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from raydist.config.loading import dump_config
from raydist.core import storage
from raydist.core.data import build_datasets
from raydist.core.preflight import PreflightError
from raydist.core.progress import plot_loss_curve, read_history
from raydist.core.resources import plan_units
from raydist.core.storage import Mirror


class StageFailed(RuntimeError):
    """A stage started but did not finish (workers kept failing); what was checkpointed is kept."""


def fit_or_explain(trainer, run_dir: Path, max_failures: int):
    """``trainer.fit()``, turning Ray Train's failure into a short message that says what is kept."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        import traceback

        # the workers' error and where it surfaced (the traceback) always show, whatever the log level
        traceback.print_exception(e)
        lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith(" ")]
        cause = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else repr(e))
        raise StageFailed(
            f"training failed after {max_failures} automatic restart(s): {cause.strip()}\n"
            f"checkpoints and logs are kept in {run_dir}; fix the cause and rerun the same command to resume"
        ) from e


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists with another config, already complete, ...)."""


# Sections that may change between a run and its resume: where it lives and how it recovers.
RESUMABLE_SECTIONS = frozenset({"run", "job", "resources"})  # a resume may run on another cluster


def config_differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted paths where two resolved configs differ, ``RESUMABLE_SECTIONS`` aside (a run may resume under
    ``current`` only when this is empty)."""
    return _diff_paths(
        {k: v for k, v in previous.items() if k not in RESUMABLE_SECTIONS},
        {k: v for k, v in current.items() if k not in RESUMABLE_SECTIONS},
    )


def run_location(cfg):
    """``<run.output_dir>/<run.name>``: a local path (made absolute) or a URI."""
    out = cfg.run.output_dir
    base = out if storage.is_uri(out) else Path(out).expanduser().resolve()
    return storage.join(base, cfg.run.name)


def open_run_dir(cfg, artifact_name: str, prepare=None) -> tuple[Mirror, bool]:
    """Create ``<output_dir>/<name>`` (a path or a URI) or decide to resume it. Returns ``(run_dir, resuming)``:
    the driver works in ``run_dir.local`` and pushes what it writes (nothing to push for a local run).

    An existing directory is resumed only when it was written by the same config (``run.*`` and ``job.*``
    aside); otherwise, or when ``run.resume: never``, or when it already holds a finished artifact, it is
    refused with a message saying what to do. Nothing in it is deleted or overwritten. ``prepare`` (e.g. the
    placement check, which starts Ray) runs after those checks and before anything is written.
    """
    try:
        location = run_location(cfg)
        rd = Mirror(location)
        started = storage.has_files(location)
    except (ValueError, OSError) as e:
        raise RunDirError(f"run.output_dir {cfg.run.output_dir!r} cannot be used: {e}") from None
    cfg_file = rd.local / "config.yaml"
    resolved = cfg.model_dump(mode="json")
    if started:
        if rd.exists(f"{artifact_name}/raydist.json"):
            raise RunDirError(
                f"run {location} is already complete (artifact at {rd.at(artifact_name)}); "
                f"choose a new run.name to train again"
            )
        if cfg.run.resume == "never":
            raise RunDirError(f"run directory {location} exists and run.resume is 'never'; choose a new run.name")
        if not rd.exists("config.yaml"):
            raise RunDirError(f"{location} exists but is not a raydist run directory; refusing to write into it")
        previous = yaml.safe_load(rd.pull("config.yaml").read_text())
        diffs = config_differences(previous, resolved)
        if diffs:
            raise RunDirError(
                f"run directory {location} was started with a different config ({', '.join(diffs[:8])} differ); "
                f"resume with the same config, or choose a new run.name"
            )
        if prepare is not None:
            prepare()
        return rd, True
    if prepare is not None:
        prepare()
    rd.local.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(dump_config(cfg))
    rd.push("config.yaml")
    return rd, False


def _diff_paths(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_paths(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def with_absolute_paths(cfg):
    """A copy of ``cfg`` whose local model paths (``model``, ``teacher``, ``student.path``) are absolute:
    workers run in other directories (and on a cluster, other machines with the same shared paths)."""

    def absolute(path: Optional[str]) -> Optional[str]:
        if path is None or storage.is_uri(path):
            return path
        p = Path(path).expanduser()
        return str(p.resolve()) if p.exists() else path

    update = {}
    for field in ("model", "teacher"):
        section = getattr(cfg, field, None)
        if section is not None:
            update[field] = section.model_copy(update={"path": absolute(section.path)})
    student = getattr(cfg, "student", None)
    if student is not None and student.path:
        update["student"] = student.model_copy(update={"path": absolute(student.path)})
    return cfg.model_copy(update=update)


def data_fingerprint(data_cfg, model_cfg, seed: int) -> str:
    """Identifies a tokenization: data config, tokenizer source and split seed."""
    blob = json.dumps(
        {"data": data_cfg.model_dump(mode="json"), "model": model_cfg.path, "gguf": model_cfg.gguf_file, "seed": seed},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def write_examples_parquet(data_dir: Path, splits: dict[str, list[dict]], fingerprint: str) -> None:
    """Write each split as ``<name>.parquet`` (input_ids/labels int32 lists), then counts and fingerprint."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, examples in splits.items():
        table = pa.table(
            {
                "input_ids": pa.array([e["input_ids"] for e in examples], type=pa.list_(pa.int32())),
                "labels": pa.array([e["labels"] for e in examples], type=pa.list_(pa.int32())),
            }
        )
        tmp = data_dir / f".{name}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, data_dir / f"{name}.parquet")
        counts[name] = len(examples)
    (data_dir / "counts.json").write_text(json.dumps(counts))
    (data_dir / "fingerprint.txt").write_text(fingerprint)  # written last: marks the data complete


VERBOSE_ENV = "RAYDIST_VERBOSE"  # 1: show Ray's own INFO records (Ray Train's reports, Ray Data's progress)
DASHBOARD_ENV = "RAYDIST_DASHBOARD"  # 1: the embedded local Ray also runs the dashboard


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_ray_options(num_cpus: int, *, dashboard: bool = False, metrics: bool = False) -> dict[str, Any]:
    """``ray.init`` options of the local Ray a stage starts on a laptop: no dashboard unless asked (it and its
    agent cost CPU time on every training step of a 2-core laptop), and always a port of its own for the API
    server.

    Why the port: even without the dashboard, Ray records ``127.0.0.1:8265`` as this cluster's API address
    when that port is already taken by another Ray's dashboard on the machine; Ray Train's
    PlacementGroupCleaner then asks the *other* cluster whether our controller is alive, is told it does not
    exist, and removes our training placement group (scripts/ray_bugs/pg_cleaner_wrong_dashboard.py).
    """
    for name, value in EMBEDDED_RAY_ENV.items():  # read by Ray's daemons and workers, which inherit it
        if name not in os.environ and not (dashboard and name == "RAY_TRAIN_METRICS_ENABLED"):
            os.environ[name] = value
    return {
        "num_cpus": num_cpus,
        "include_dashboard": dashboard,
        "dashboard_port": free_port(),
        "logging_config": ray_logging_config(),
        # Nothing reads Prometheus metrics of a training run without a dashboard (serve asks for them: its
        # /metrics), and prestarted idle workers cost CPU on a laptop (BENCHMARKS.md, Fine-tuning: what Ray's
        # own processes use per step).
        "_system_config": {"enable_metrics_collection": dashboard or metrics, "enable_worker_prestart": False},
    }


# Environment of the embedded Ray (a user's own setting wins). Ray's log monitor globs the log directory ten
# times a second unless there are over 1000 files; once a second is enough for a laptop's console. Ray Train's
# controller / worker metrics only feed the dashboard.
# Ray Data settings for every Ray raydist runs on (embedded, and a submitted job's env_vars). raydist writes one
# parquet file per split; Ray 2.60's parquet reader starts up to 32 FooterReader actors (each a Python process
# importing pyarrow and Ray) to read the footers of those 1-2 files: on 2 cores that was ~45 s of a tiny
# fine-tune trial's ~80 s start (scripts/bench: jobs/sweep_finetune_tiny.yaml, 326 s -> 151 s).
RAY_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}

# glibc malloc settings of CPU training workers (a user's `job.env` wins). By default glibc serves every
# allocation over 32 MiB with a fresh mmap and unmaps it on free, so each step's big tensors (a [V, H]
# embedding gradient, [N, V] logits) arrive as untouched pages and fault in one 4 KiB page at a time: that
# was ~40 % of a 33M-parameter student's backward here (0.71 -> 0.40 s, scripts/bench/distill.py measures
# the steps). No mmap and no trimming keep the freed memory in the process for the next step, as the caching
# allocators (jemalloc, tcmalloc) that PyTorch's CPU tuning guides preload do; the price is that a worker's
# resident memory stays at its peak until it exits. One arena: Ray Train runs the loop in a thread of the
# worker, whose own glibc arena would still hand such tensors back to the kernel (0.70 -> 0.64 s instead of
# 0.42 s for that backward run in a thread).
CPU_WORKER_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62), "MALLOC_ARENA_MAX": "1"}


def train_worker_env(job_env: dict[str, str], *, on_gpu: bool) -> dict[str, str]:
    """Environment of the Ray Train workers: raydist's settings (the CPU allocator ones only on CPU), then
    the user's ``job.env``, which wins."""
    base = {"TOKENIZERS_PARALLELISM": "false", VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "0")}
    return {**base, **({} if on_gpu else CPU_WORKER_MALLOC_ENV), **job_env}


EMBEDDED_RAY_ENV = {
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "1.0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    **RAY_DATA_ENV,
}


def ray_logging_config():
    """Ray's records in every worker: WARNING and up unless ``RAYDIST_VERBOSE=1`` (raydist's own progress lines
    are printed, not logged, so they always show; errors always show)."""
    import ray

    return ray.LoggingConfig(log_level="INFO" if os.environ.get(VERBOSE_ENV) == "1" else "ERROR")


def quiet_ray_worker_logs() -> None:
    """Inside a Ray worker (train worker, trial): Ray's INFO / WARNING records stay out of the console unless
    ``RAYDIST_VERBOSE=1`` (they still go to Ray's log files). Ray Train names some loggers by file path
    (``logging.getLogger(__file__)``: "Reporting training result ..."), so they are matched by path too."""
    import logging

    import ray

    if os.environ.get(VERBOSE_ENV) == "1":
        return
    ray_dir = os.path.dirname(ray.__file__)

    class QuietRay(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            from_ray = record.name == "ray" or record.name.startswith(("ray.", ray_dir))
            return record.levelno >= logging.ERROR or not from_ray

    logging.getLogger("ray.train").setLevel(logging.ERROR)
    for name in ("", "ray", "ray.data", "ray.train", "ray.tune"):  # Ray Data / Train configure their own handlers
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, QuietRay) for f in handler.filters):
                handler.addFilter(QuietRay())
    import warnings

    # deprecation notices from inside torch.distributed / transformers / DeepSpeed: nothing a user can act on
    for module in ("torch.distributed", "transformers", "deepspeed"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)


def quiet_ray_driver_logs() -> None:
    """The driver side of ``ray_logging_config``: Train / Tune / Data INFO records only with --verbose."""
    import logging

    if os.environ.get(VERBOSE_ENV) != "1":
        for name in ("ray.train", "ray.tune", "ray.data", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)


def init_ray(cpus_needed: float, *, metrics: bool = False) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray with room for the workers plus Ray Data
    (``metrics``: with Ray's Prometheus metrics endpoint, which serve's metrics are read from)."""
    import ray

    if ray.is_initialized():
        return
    quiet_ray_driver_logs()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_config=ray_logging_config())
    else:
        # Ray Data tasks need CPUs beside the training workers; oversubscribing a small box is fine.
        ray.init(
            **embedded_ray_options(
                int(max(os.cpu_count() or 1, cpus_needed + 2)),
                dashboard=os.environ.get(DASHBOARD_ENV) == "1",
                metrics=metrics,
            )
        )


def tokenize_once(run_dir: Mirror, data_cfg, model_cfg, seed: int, tokenizer, say) -> dict[str, int]:
    """Tokenize train/eval into ``run_dir/data`` unless an identical tokenization is already there (a
    resumed run reuses the same files, so its data order is identical). Returns the split sizes."""
    import time

    data_dir = run_dir.local / "data"
    fp = data_fingerprint(data_cfg, model_cfg, seed)
    if run_dir.remote and run_dir.exists("data/fingerprint.txt"):
        run_dir.pull("data")
    if not (data_dir / "fingerprint.txt").is_file() or (data_dir / "fingerprint.txt").read_text() != fp:
        t0 = time.time()
        train_ex, eval_ex = build_datasets(data_cfg, tokenizer, seed)
        write_examples_parquet(data_dir, {"train": train_ex, "eval": eval_ex}, fp)
        storage.upload(data_dir, run_dir.at("data"), last="fingerprint.txt") if run_dir.remote else None
        say(f"[raydist] tokenized {len(train_ex)} train / {len(eval_ex)} eval sequences in {time.time() - t0:.1f}s")
    return json.loads((data_dir / "counts.json").read_text())


def read_parquet(location, **kwargs):
    """``ray.data.read_parquet`` of a local path or a URI (its filesystem resolved the way raydist resolves it)."""
    import ray

    if isinstance(location, (list, tuple)):
        if not location:
            raise ValueError("no parquet files to read")
        fs, _ = storage.filesystem(location[0])
        return ray.data.read_parquet([storage.filesystem(x)[1] for x in location], filesystem=fs, **kwargs)
    fs, path = storage.filesystem(location)
    return ray.data.read_parquet(path, filesystem=fs, **kwargs)


def plan_steps(counts: dict[str, int], train_cfg, world: int) -> tuple[int, int]:
    """``(total_steps, micro_batches_per_epoch)`` for this data size, batch shape and world size."""
    global_rows = train_cfg.micro_batch_size * world
    micro_per_epoch = counts["train"] // global_rows
    if micro_per_epoch < train_cfg.grad_accum_steps:
        raise PreflightError(
            f"the training data has {counts['train']} sequences, fewer than one optimizer step needs "
            f"({global_rows * train_cfg.grad_accum_steps} = micro_batch_size x num_workers x grad_accum_steps)"
        )
    total = train_cfg.max_steps or max(1, int(train_cfg.epochs * micro_per_epoch) // train_cfg.grad_accum_steps)
    return total, micro_per_epoch


def fault_from_env() -> Optional[dict[str, Any]]:
    """Fault-injection drill for tests and chaos runs: kill the last worker once at a given step.

    ``RAYDIST_FAULT_AT_STEP=k`` and ``RAYDIST_FAULT_MARKER=/path``: the marker file records that the fault
    happened, so the restarted worker does not die again.
    """
    step = os.environ.get("RAYDIST_FAULT_AT_STEP")
    if not step:
        return None
    return {"step": int(step), "marker": os.environ["RAYDIST_FAULT_MARKER"]}


def plan_training(cfg):
    """Start / join Ray and resolve what each training worker reserves; refuses (PreflightError) what the
    cluster cannot place. Called before the run directory is opened, so a refused run writes nothing."""

    init_ray(cfg.scaling.num_workers * cfg.resources.num_cpus)
    return plan_units(
        cfg.resources, cfg.scaling.num_workers, "training worker", placement_strategy=cfg.scaling.placement_strategy
    )


def train_on_ray(
    loop_fn,
    cfg,
    run_dir: Mirror,
    counts: dict[str, int],
    extra: dict[str, Any],
    say,
    what: str,
    train_files: Optional[list[str]] = None,
) -> None:
    """Run ``loop_fn`` on ``cfg.scaling.num_workers`` Ray Train workers over the tokenized data
    (``train_files`` replaces ``data/train.parquet``, e.g. by a teacher cache with the same rows).

    The workers get a plain dict: the resolved config, the run dir, the step plan, the device choice, the
    fault drill and ``extra`` (stage-specific). Returns when training finished or stopped on purpose.
    """
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    world = cfg.scaling.num_workers
    total_steps, micro_per_epoch = plan_steps(counts, cfg.train, world)
    plan = plan_training(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False  # they garble the progress lines
    use_gpu = plan.computes_on_gpu  # NCCL between GPU ranks; each worker still checks what it was given
    datasets = {"train": read_parquet(train_files or run_dir.at("data", "train.parquet"))}
    if counts["eval"]:
        datasets["eval"] = read_parquet(run_dir.at("data", "eval.parquet"))
    loop_config = {
        "cfg": cfg.model_dump(mode="json"),
        "run_dir": str(run_dir.location),
        "total_steps": total_steps,
        "micro_per_epoch": micro_per_epoch,
        "n_eval": counts["eval"],
        "device": cfg.resources.device,
        "fault": fault_from_env(),
        **extra,
    }
    worker_env = train_worker_env(cfg.job.env, on_gpu=use_gpu)
    for var, value in storage.storage_env().items():  # the workers reach the same storage the driver does
        worker_env.setdefault(var, value)
    fs, storage_path = storage.filesystem(storage.parent_of(run_dir.location))
    trainer = TorchTrainer(
        loop_fn,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=world,
            use_gpu=plan.num_gpus > 0,
            resources_per_worker=plan.ray_resources(),
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=storage_path,
            storage_filesystem=fs if run_dir.remote else None,
            # Ray Train's own records ("Reporting training result ...", checkpoint paths) only with --verbose
            logging_config=LoggingConfig(log_level="INFO" if os.environ.get(VERBOSE_ENV) == "1" else "ERROR"),
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
    say(f"[raydist] {what}: {total_steps} steps on {plan.describe()} workers (ZeRO-{cfg.deepspeed.zero_stage})")
    fit_or_explain(trainer, run_dir.location, cfg.run.max_failures)


def finish_run(run_dir: Mirror, artifact_name: str, stop_after: Optional[int], title: str, say):
    """Draw the loss curve; return the artifact's location (or the run dir's when the run stopped early on
    purpose): a ``Path`` for a local run, the URI string for remote storage."""

    history = read_history(run_dir.pull("metrics.jsonl"))
    plot_loss_curve(history, run_dir.local / "loss_curve.png", title=title)
    run_dir.push("loss_curve.png")
    if not run_dir.exists(f"{artifact_name}/raydist.json"):
        say(f"[raydist] stopped after step {stop_after}; rerun the same command to resume")
        return run_dir.location
    say(f"[raydist] loss curve: {run_dir.at('loss_curve.png')}")
    say(f"[raydist] artifact: {run_dir.at(artifact_name)}")
    return run_dir.at(artifact_name)
