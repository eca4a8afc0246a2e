"""What a submission carries, decided before any cluster is contacted: the stage's resolved config, every local path
it reads (shipped in the job's working_dir and rewritten to its place there), the runtime env and the entrypoint."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import secrets
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml
from pydantic import BaseModel

from raydist.config import base, distill, generate, pipeline, serve, stage_config_class
from raydist.config.loading import ConfigError, config_from_dict
from raydist.core.runs import RAY_DATA_ENV
from raydist.core.storage import is_uri

STAGES = ("finetune", "distill", "generate", "sweep", "serve", "pipeline")


JOB_CONFIG = "raydist_job.yaml"  # the config file's name inside the working_dir


EXTERNAL_DIR = "external"  # where files from outside the current directory land inside the working_dir


# Ray's job server accepts a working_dir upload of at most 100 MiB (the dashboard's client_max_size,
# ray_constants.DASHBOARD_CLIENT_MAX_SIZE; the GCS would keep up to 512 MiB). A model bigger than that
# belongs on storage every node reads, not in every job's upload.
MAX_WORKING_DIR_BYTES = 100 * 1024**2


MAX_SHIPPED_MODEL_BYTES = 100 * 1024**2


class SubmitError(ValueError):
    """A job cannot be submitted or looked up as asked; the message names the cause (file, address, job)."""


@dataclass
class PathRef:
    """One path-valued field of a config: where it is, what it is, and what happens to it."""

    location: tuple  # keys from the config's top (str fields, int list indexes)
    kind: str  # "data" | "model" | "files" | "output"
    value: str

    @property
    def dotted(self) -> str:
        return ".".join(str(k) for k in self.location)


@dataclass
class JobPlan:
    """What `raydist submit` will send: the staged working_dir and every decision about a path."""

    stage: str
    config: Any  # the validated config (local paths, as the user wrote them)
    data: dict  # the config as written, overrides applied, paths rewritten into the working_dir
    shipped: list[tuple[PathRef, Path, str]] = field(default_factory=list)  # (field, local source, dest in wd)
    passed: list[tuple[PathRef, str]] = field(default_factory=list)  # (field, why) read as-is on the cluster
    notes: list[str] = field(default_factory=list)

    @property
    def remote_inputs(self) -> list[PathRef]:
        """Inputs only the cluster can check (URIs, paths absent here): the local checks cannot run."""
        return [ref for ref, _ in self.passed if ref.kind != "output"]

    def run_name(self) -> str:
        cfg = self.config
        if self.stage == "pipeline":
            return cfg.name
        if self.stage == "generate":
            return Path(cfg.output).stem or "generate"
        if self.stage == "serve":
            return cfg.model_name or Path(cfg.artifact.rstrip("/")).name or "serve"
        return cfg.run.name


def _walk(model: BaseModel, location: tuple = ()) -> Iterator[tuple[tuple, BaseModel]]:
    yield location, model
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _walk(value, location + (name,))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _walk(item, location + (name, i))


def _path_fields() -> dict[type, dict[str, str]]:
    """Which fields of which config classes hold paths, and of what kind. Walking the validated config by
    class (rather than listing dotted names per stage) finds them wherever they nest: a sweep's fine-tuning
    config, every section of a pipeline."""

    return {
        base.DataSourceConfig: {"path": "data"},
        base.ModelConfig: {"path": "model"},
        distill.StudentConfig: {"path": "model"},
        serve.ServeConfig: {"artifact": "model", "adapter": "model"},
        base.JobSettings: {"files": "files"},
        base.RunSettings: {"output_dir": "output"},
        generate.GenerateConfig: {"output": "output"},
        distill.KDSettings: {"cache_dir": "output"},
        pipeline.PipelineConfig: {"output_dir": "output"},
    }


def path_refs(cfg: BaseModel) -> list[PathRef]:
    """Every path-valued field set in ``cfg`` (unset optional ones and built-in sources are skipped)."""
    table = _path_fields()
    refs = []
    for location, node in _walk(cfg):
        for cls, fields in table.items():
            if not isinstance(node, cls):
                continue
            for name, kind in fields.items():
                value = getattr(node, name)
                if isinstance(value, list):
                    refs += [PathRef(location + (name, i), kind, v) for i, v in enumerate(value)]
                elif isinstance(value, str):
                    refs.append(PathRef(location + (name,), kind, value))
    return refs


def _get(data: Any, location: tuple) -> Any:
    for key in location:
        if isinstance(key, int):
            data = data[key] if isinstance(data, list) and key < len(data) else None
        else:
            data = data.get(key) if isinstance(data, dict) else None
    return data


def _set(data: Any, location: tuple, value: Any) -> None:
    for key in location[:-1]:
        data = data[key]
    data[location[-1]] = value


def tree_bytes(path: Path, stop_above: Optional[int] = None) -> int:
    """Bytes of a file or directory tree (stops counting once above ``stop_above``: big model dirs)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
            if stop_above is not None and total > stop_above:
                return total
    return total


def _mib(n: int) -> str:
    return f"{n / 1024**2:.0f} MiB"


def _destination(src: Path, base: Path, taken: dict[str, Path]) -> str:
    """Where ``src`` goes inside the working_dir: its path relative to ``base`` when it is inside it (so
    relative references between shipped files keep working), else ``external/<n>-<name>``."""
    try:
        rel = src.relative_to(base).as_posix()
    except ValueError:
        rel = None
    if rel in (None, ".", JOB_CONFIG) or (rel and rel.split("/")[0] == EXTERNAL_DIR):
        rel = f"{EXTERNAL_DIR}/{len([d for d in taken if d.startswith(EXTERNAL_DIR + '/')])}-{src.name}"
    return rel


def plan_job(stage: str, data: dict, cfg: BaseModel, base: Optional[Path] = None) -> JobPlan:
    """Decide what ships in the job's working_dir and rewrite the config's paths to match.

    Args:
        stage: the sub-command the job runs (``finetune`` ... ``pipeline``).
        data: the config as read from YAML with the dotted overrides applied.
        cfg: ``data`` validated as the stage's config class.
        base: the directory relative paths are read from (default: the current directory).

    Returns:
        A :class:`JobPlan`; nothing is copied yet (see :func:`stage_working_dir`).

    Raises:
        SubmitError: a local model directory too big to ship, a ``job.files`` entry that does not exist,
            or more than Ray's working_dir limit in total.
    """
    base = (base or Path.cwd()).resolve()
    plan = JobPlan(stage=stage, config=cfg, data=copy.deepcopy(data))
    taken: dict[str, Path] = {}
    by_source: dict[Path, str] = {}
    relative_outputs = []
    total = 0
    for ref in path_refs(cfg):
        if _get(plan.data, ref.location) != ref.value:
            continue  # filled in by a default (e.g. a pipeline section's copy of the top-level job): not the user's
        if ref.kind == "output":
            if not is_uri(ref.value) and not Path(ref.value).expanduser().is_absolute():
                relative_outputs.append(f"{ref.dotted}={ref.value!r}")
            continue
        if ref.value.startswith("@") or ref.value == "tiny-random":
            continue  # a pipeline reference or the built-in test model: nothing on disk
        if is_uri(ref.value):
            plan.passed.append((ref, "a URI"))
            continue
        src = Path(ref.value).expanduser()
        src = src if src.is_absolute() else base / src
        if not src.exists():
            if ref.kind == "files":
                raise SubmitError(f"{ref.dotted}: {ref.value} does not exist (job.files lists local files to ship)")
            plan.passed.append((ref, "not found here; read on the cluster as written (a cluster path or hub id)"))
            continue
        src = src.resolve()
        if src in by_source:
            _set(plan.data, ref.location, by_source[src])
            continue
        size = tree_bytes(src, stop_above=MAX_WORKING_DIR_BYTES)
        if ref.kind == "model" and size > MAX_SHIPPED_MODEL_BYTES:
            raise SubmitError(
                f"{ref.dotted}: the local model {ref.value} is over {_mib(MAX_SHIPPED_MODEL_BYTES)}, too big to ship "
                f"with every job; put it on storage every node reads (a shared path or a URI such as s3://...) "
                f"and point {ref.dotted} there"
            )
        total += size
        if total > MAX_WORKING_DIR_BYTES:
            raise SubmitError(
                f"{ref.dotted}: the files to ship reach {_mib(total)} with {ref.value}, over Ray's "
                f"{_mib(MAX_WORKING_DIR_BYTES)} working_dir limit; put large data on shared storage or a URI"
            )
        dest = _destination(src, base, taken)
        taken[dest] = src
        by_source[src] = dest
        plan.shipped.append((ref, src, dest))
        _set(plan.data, ref.location, dest)
    if plan.passed:
        plan.notes.append(
            "passed through unchanged (checked on the cluster): "
            + ", ".join(f"{ref.dotted}={ref.value!r} ({why})" for ref, why in plan.passed)
        )
    if relative_outputs:
        plan.notes.append(
            "relative output path(s) " + ", ".join(relative_outputs) + " resolve inside the job's working_dir on "
            "the cluster, which Ray deletes with the job's runtime resources: use an absolute path on shared "
            "storage or a URI to keep the results"
        )
    _revalidate(plan)
    return plan


def _revalidate(plan: JobPlan) -> None:
    """The rewritten config must still be a valid config of the same stage (a wrong rewrite fails here)."""

    try:
        config_from_dict(stage_config_class(plan.stage), plan.data, f"{JOB_CONFIG} (rewritten for the job)")
    except ConfigError as e:  # a bug in the rewrite, not in the user's config
        raise RuntimeError(str(e)) from None


def stage_working_dir(plan: JobPlan, root: Path) -> Path:
    """Copy the planned files into ``root`` and write the rewritten config as ``root/raydist_job.yaml``."""
    root.mkdir(parents=True, exist_ok=True)
    for _, src, dest in plan.shipped:
        target = root / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
    (root / JOB_CONFIG).write_text(yaml.safe_dump(plan.data, sort_keys=False))
    return root


def raydist_package_dir() -> Path:
    """The directory of the raydist package this client runs (what ``py_modules`` ships)."""
    import raydist

    return Path(raydist.__file__).resolve().parent


def runtime_env(plan: JobPlan, working_dir: Path) -> dict[str, Any]:
    """The job's runtime_env: working_dir, raydist as a py_module, and ``job.env`` (over raydist's Ray Data
    settings, ``RAY_DATA_ENV``) as env_vars."""
    return {
        "working_dir": str(working_dir),
        # raydist travels as py_modules, not pip: it is not on PyPI, and a `pip` runtime_env builds a fresh
        # virtualenv per job that would reinstall torch/ray/deepspeed (GBs, minutes) on every node.
        # py_modules ships exactly the client's raydist code (a few hundred KB, zipped by Ray, put first on
        # PYTHONPATH of the driver and every worker), so the job runs the code that was validated here.
        # The cluster's image must already have raydist's dependencies (torch, transformers, deepspeed...).
        "py_modules": [str(raydist_package_dir())],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": {**RAY_DATA_ENV, **plan.config.job.env},  # the spec's own setting wins
    }


def entrypoint(stage: str, python: str) -> str:
    """The job's shell command; ``serve`` takes its config as a positional target."""
    if stage == "serve":
        return f"{shlex.quote(python)} -m raydist serve {JOB_CONFIG}"
    return f"{shlex.quote(python)} -m raydist {stage} -c {JOB_CONFIG}"


def submission_id(stage: str, run_name: str) -> str:
    """``raydist-<stage>-<run name>-<8 hex>``: readable in `ray job list`, unique per submission."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_name).strip("-")[:60] or "run"
    return f"raydist-{stage}-{name}-{secrets.token_hex(4)}"
