"""Driver-side pieces every Ray stage shares: Ray start-up, run directories, tokenized data on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from raydist.components.preflight import PreflightError
from raydist.config.loading import dump_config


class StageFailed(RuntimeError):
    """A stage started but did not finish (workers kept failing); what was checkpointed is kept."""


def fit_or_explain(trainer, run_dir: Path, max_failures: int):
    """``trainer.fit()``, turning Ray Train's failure into a short message that says what is kept."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip() and not ln.startswith(" ")]
        cause = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else repr(e))
        raise StageFailed(
            f"training failed after {max_failures} automatic restart(s): {cause.strip()}\n"
            f"checkpoints and logs are kept in {run_dir}; fix the cause and rerun the same command to resume"
        ) from e


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists with another config, already complete, ...)."""


# Sections that may change between a run and its resume: where it lives and how it recovers.
_RESUMABLE_SECTIONS = {"run"}


def open_run_dir(cfg, artifact_name: str) -> tuple[Path, bool]:
    """Create ``<output_dir>/<name>`` or decide to resume it. Returns ``(run_dir, resuming)``.

    An existing directory is resumed only when it was written by the same config (``run.*`` aside);
    otherwise, or when ``run.resume: never``, or when it already holds a finished artifact, it is refused
    with a message saying what to do. Nothing in it is deleted or overwritten.
    """
    run_dir = Path(cfg.run.output_dir).expanduser().resolve() / cfg.run.name
    cfg_file = run_dir / "config.yaml"
    resolved = cfg.model_dump(mode="json")
    if run_dir.exists() and any(run_dir.iterdir()):
        if (run_dir / artifact_name / "raydist.json").is_file():
            raise RunDirError(
                f"run {run_dir} is already complete (artifact at {run_dir / artifact_name}); "
                f"choose a new run.name to train again"
            )
        if cfg.run.resume == "never":
            raise RunDirError(f"run directory {run_dir} exists and run.resume is 'never'; choose a new run.name")
        if not cfg_file.is_file():
            raise RunDirError(f"{run_dir} exists but is not a raydist run directory; refusing to write into it")
        previous = yaml.safe_load(cfg_file.read_text())
        diffs = _diff_paths(
            {k: v for k, v in previous.items() if k not in _RESUMABLE_SECTIONS},
            {k: v for k, v in resolved.items() if k not in _RESUMABLE_SECTIONS},
        )
        if diffs:
            raise RunDirError(
                f"run directory {run_dir} was started with a different config ({', '.join(diffs[:8])} differ); "
                f"resume with the same config, or choose a new run.name"
            )
        return run_dir, True
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(dump_config(cfg))
    return run_dir, False


def _diff_paths(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_paths(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def with_absolute_paths(cfg):
    """A copy of ``cfg`` whose local model path is absolute: workers run in other directories (and on a
    cluster, other machines with the same shared paths)."""
    p = Path(cfg.model.path).expanduser()
    if p.exists():
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(p.resolve())})})
    return cfg


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


def init_ray(cpus_needed: float) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray with room for the workers plus Ray Data."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # Ray Data tasks need CPUs beside the training workers; oversubscribing a small box is fine.
        ray.init(num_cpus=int(max(os.cpu_count() or 1, cpus_needed + 2)))


def resolve_use_gpu(use_gpu: Union[bool, Literal["auto"]], num_workers: int) -> bool:
    """``auto`` means GPU workers when the cluster has a GPU for each."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if use_gpu == "auto":
        return gpus >= num_workers
    if use_gpu and gpus < num_workers:
        raise PreflightError(f"scaling.use_gpu is true but the cluster has {gpus:g} GPUs for {num_workers} workers")
    return bool(use_gpu)
