"""`raydist submit` / `raydist jobs`: run a stage on a Ray cluster through Ray's Jobs API.

A submission is three things Ray already knows how to carry (``ray.job_submission.JobSubmissionClient``):

* ``working_dir``: a fresh directory holding the resolved config (``raydist_job.yaml``, overrides applied)
  and the local files it reads (data files, ``job.files``, small model directories), with the config's
  paths rewritten to point inside it. URIs and paths that do not exist here (a cluster path, a hub id) are
  passed through unchanged and named in a note. Outputs are never shipped: ``run.output_dir`` should be a
  shared path or a URI.
* ``py_modules``: raydist itself, see :func:`runtime_env`.
* ``env_vars``: the spec's ``job.env``, for the driver and every worker it starts.

The entrypoint is ``<python> -m raydist <stage> -c raydist_job.yaml``. Everything that can be refused
locally is refused before the cluster is contacted (the caller runs ``raydist validate``'s checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import yaml
from pydantic import BaseModel

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

PROBE_TIMEOUT_S = 5.0  # JobSubmissionClient's own requests have no timeout: an unroutable host would hang
STOP_WAIT_S = 60.0

# Exit statuses of `raydist submit --follow` / `raydist jobs logs --follow` (2 is a usage error and 3 the
# sweep's "no candidate met the policy", so a stopped job gets 4).
EXIT_SUCCEEDED, EXIT_FAILED, EXIT_STOPPED = 0, 1, 4
EXIT_INTERRUPTED = 130  # Ctrl-C while following: the job keeps running

TOKEN_HELP = (
    "set RAY_AUTH_TOKEN to the token, or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in "
    "~/.ray/auth_token (`ray get-auth-token` prints it on a machine of the cluster)"
)


class SubmitError(ValueError):
    """A job cannot be submitted or looked up as asked; the message names the cause (file, address, job)."""


# ----------------------------------------------------------------------------------------- working_dir


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
    from raydist.config import base, distill, generate, pipeline, serve

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
    from raydist.config import stage_config_class
    from raydist.config.loading import ConfigError, config_from_dict

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


# -------------------------------------------------------------------------------- address and token


def resolve_address(address: Optional[str] = None) -> tuple[str, str]:
    """The job server's URL and where it came from: ``--address``, else ``RAY_API_SERVER_ADDRESS``, else
    ``RAY_ADDRESS`` when it is an http(s) URL (a ``host:port`` RAY_ADDRESS is the GCS, not the job server),
    else ``http://127.0.0.1:8265`` (a local ``ray start --head``)."""
    if address:
        url, source = address, "--address"
    elif os.environ.get("RAY_API_SERVER_ADDRESS"):
        url, source = os.environ["RAY_API_SERVER_ADDRESS"], "RAY_API_SERVER_ADDRESS"
    elif os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        url, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    else:
        url, source = "http://127.0.0.1:8265", "default"
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise SubmitError(f"job server address {url!r} ({source}) is not an http(s) URL, e.g. http://head:8265")
    return url.rstrip("/"), source


def find_token() -> tuple[Optional[str], Optional[str]]:
    """``(token, where it came from)`` in Ray's own order: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
    ``~/.ray/auth_token``; ``(None, None)`` when there is none.

    Ray's C++ token loader does the same lookup, but only when this process itself runs with
    ``RAY_AUTH_MODE=token``, cannot say where a token came from, and aborts the process on an unreadable
    ``RAY_AUTH_TOKEN_PATH``; the messages here need all three.
    """
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({e.strerror})") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
        return token, f"RAY_AUTH_TOKEN_PATH={path}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        token = default.read_text().strip()
        if token:
            return token, str(default)
    return None, None


@contextlib.contextmanager
def _api_server_address(url: str):
    # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given
    # (ray.dashboard.utils.get_address_for_submission_client); pin the one resolved here so that
    # `--address` wins over the environment and a GCS-style RAY_ADDRESS never sends it looking for a GCS.
    old = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = url
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = old


def connect(address: Optional[str] = None):
    """A ``JobSubmissionClient`` for the resolved address, with the token when the cluster wants one.

    The cluster is probed first with a short timeout (``GET /api/authentication_mode``, which Ray answers
    without a token): the client's own requests have no timeout, so an unroutable host would hang.

    Raises:
        SubmitError: unreachable address, no token for a token cluster, or a token it rejects.
    """
    import requests

    url, source = resolve_address(address)
    where = url if source in ("--address", "default") else f"{url} (from {source})"
    try:
        probe = requests.get(f"{url}/api/authentication_mode", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as e:
        reason = type(e).__name__ if isinstance(e, requests.Timeout) else str(e).split(": ")[-1][:200]
        raise SubmitError(
            f"cannot reach the Ray job server at {where}: {reason}; is the cluster up "
            f"(its dashboard port, default 8265)? Set --address or RAY_API_SERVER_ADDRESS"
        ) from None
    mode = "disabled"
    if probe.status_code == 200:
        with contextlib.suppress(ValueError, AttributeError):
            mode = probe.json().get("authentication_mode", "disabled")
    headers = {}
    token_source = None
    if mode == "token":
        token, token_source = find_token()
        if token is None:
            raise SubmitError(f"the cluster at {where} requires a token: {TOKEN_HELP}")
        headers["Authorization"] = f"Bearer {token}"

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        with _api_server_address(url):
            client = JobSubmissionClient(url, headers=headers)
    except AuthenticationError:
        if token_source is None:  # the probe said no auth (an older Ray?) but the server wants a token
            raise SubmitError(f"the cluster at {where} requires a token: {TOKEN_HELP}") from None
        raise SubmitError(
            f"the cluster at {where} requires a token: the one from {token_source} was rejected; {TOKEN_HELP}"
        ) from None
    except (ConnectionError, requests.RequestException) as e:
        raise SubmitError(f"cannot talk to the Ray job server at {where}: {e}") from None
    except RuntimeError as e:  # a reachable server that is not a (recent enough) Ray job server
        raise SubmitError(f"{where} is not a usable Ray job server: {e}") from None
    client.raydist_url = url
    return client


# ---------------------------------------------------------------------------------------- submit


def describe_interpreter(python: str) -> str:
    """One line saying what ``python`` will mean on the cluster."""
    if "/" in python:
        return f"the job runs with {python} on the head node (it must have raydist's dependencies installed)"
    return (
        f"the job runs with `{python}`: whatever `{python}` is first on the head node's PATH (the job's "
        f"entrypoint is a shell command there); set --python or job.python if that is not the environment "
        f"with raydist's dependencies"
    )


def submit(
    plan: JobPlan,
    address: Optional[str] = None,
    python: Optional[str] = None,
    follow: bool = False,
    say: Callable[[str], None] = print,
    config_name: str = "",
) -> int:
    """Stage the working_dir, submit the job, print its id; with ``follow`` stream its logs.

    Returns:
        The exit status: 0 when submitted (or, following, SUCCEEDED), 1 FAILED, 4 STOPPED.

    Raises:
        SubmitError: the cluster is unreachable or refuses the token (nothing was submitted).
    """
    client = connect(address)
    python = python or plan.config.job.python
    sid = submission_id(plan.stage, plan.run_name())
    command = entrypoint(plan.stage, python)
    for _, src, dest in plan.shipped:
        say(f"[raydist] shipping {src} as {dest}")
    for note in plan.notes:
        say(f"[raydist] note: {note}")
    say(f"[raydist] {describe_interpreter(python)}")
    with tempfile.TemporaryDirectory(prefix="raydist-job-") as tmp:
        wd = stage_working_dir(plan, Path(tmp) / "working_dir")
        metadata = {"raydist_stage": plan.stage, "raydist_run": plan.run_name(), "raydist_config": config_name}
        # submit_job zips and uploads working_dir and py_modules before it returns, so tmp can go afterwards.
        client.submit_job(entrypoint=command, submission_id=sid, runtime_env=runtime_env(plan, wd), metadata=metadata)
    say(f"[raydist] submitted job {sid} to {client.raydist_url}: {command}")
    if not follow:
        say(f"[raydist] follow it with `raydist jobs logs {sid} --follow`; stop it with `raydist jobs stop {sid}`")
        return 0
    return follow_job(client, sid, say)


def follow_job(client, job_id: str, say: Callable[[str], None] = print) -> int:
    """Stream a job's logs until it ends; return its exit status (0 SUCCEEDED, 1 FAILED, 4 STOPPED)."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        try:
            asyncio.run(tail())
        except RuntimeError as e:  # the websocket closed abnormally (e.g. the head restarted): poll instead
            say(f"[raydist] log stream ended ({e}); waiting for the job to finish")
        info = client.get_job_info(job_id)
        while not info.status.is_terminal():
            time.sleep(1.0)
            info = client.get_job_info(job_id)
    except KeyboardInterrupt:
        say(
            f"\n[raydist] stopped following; job {job_id} keeps running "
            f"(`raydist jobs logs {job_id} --follow`, `raydist jobs stop {job_id}`)"
        )
        return EXIT_INTERRUPTED
    return report_final(info, say)


def first_line(message: Optional[str]) -> str:
    """A job's message without the log tail Ray appends to a failed job's ("last available logs ...")."""
    line = (message or "").strip().split("\n")[0]
    return line.split(", last available logs")[0]


def report_final(info, say: Callable[[str], None] = print) -> int:
    """Print a finished job's outcome; the exit status that goes with it."""
    from ray.job_submission import JobStatus

    if info.status == JobStatus.SUCCEEDED:
        say(f"[raydist] job {info.submission_id} SUCCEEDED")
        return EXIT_SUCCEEDED
    exit_code = getattr(info, "driver_exit_code", None)
    detail = f" (driver exit code {exit_code})" if exit_code is not None else ""
    say(f"[raydist] job {info.submission_id} {info.status.value}{detail}: {first_line(info.message)}".rstrip(": "))
    return EXIT_STOPPED if info.status == JobStatus.STOPPED else EXIT_FAILED


# ------------------------------------------------------------------------------------------ jobs


def _job_call(fn, job_id: str, url: str):
    try:
        return fn(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise SubmitError(f"no job {job_id!r} on the cluster at {url}") from None
        raise


def _when(ms: Optional[int]) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def list_jobs(address: Optional[str] = None, say: Callable[[str], None] = print) -> int:
    """Print every job on the cluster, oldest first: id, status, stage, run name, start time."""
    client = connect(address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [("ID", "STATUS", "STAGE", "RUN", "STARTED")]
    for j in jobs:
        meta = j.metadata or {}
        rows.append(
            (
                j.submission_id or j.job_id or "-",
                j.status.value,
                meta.get("raydist_stage", "-"),
                meta.get("raydist_run", "-"),
                _when(j.start_time),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        say("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if not jobs:
        say(f"(no jobs on the cluster at {client.raydist_url})")
    return 0


def job_status(job_id: str, address: Optional[str] = None, say: Callable[[str], None] = print) -> int:
    """Print a job's status, stage, run, times, entrypoint and message."""
    client = connect(address)
    info = _job_call(client.get_job_info, job_id, client.raydist_url)
    meta = info.metadata or {}
    say(f"{job_id}: {info.status.value}")
    say(f"  stage {meta.get('raydist_stage', '-')}, run {meta.get('raydist_run', '-')}")
    say(f"  started {_when(info.start_time)}, ended {_when(info.end_time)}")
    say(f"  entrypoint: {info.entrypoint}")
    if getattr(info, "driver_exit_code", None) is not None:
        say(f"  driver exit code: {info.driver_exit_code}")
    if info.message:
        say(f"  message: {first_line(info.message)}")
    if info.status.value == "FAILED":
        say(f"  the driver's output, traceback included: `raydist jobs logs {job_id}`")
    return 0


def job_logs(
    job_id: str, address: Optional[str] = None, follow: bool = False, say: Callable[[str], None] = print
) -> int:
    """Print a job's logs so far; with ``follow``, stream them and return the job's exit status."""
    client = connect(address)
    if follow:
        _job_call(client.get_job_info, job_id, client.raydist_url)
        return follow_job(client, job_id, say)
    sys.stdout.write(_job_call(client.get_job_logs, job_id, client.raydist_url))
    sys.stdout.flush()
    return 0


def stop_job(
    job_id: str, address: Optional[str] = None, say: Callable[[str], None] = print, wait_s: float = STOP_WAIT_S
) -> int:
    """Ask Ray to stop a job (SIGTERM, then SIGKILL after Ray's grace period) and report its final status."""
    client = connect(address)
    info = _job_call(client.get_job_info, job_id, client.raydist_url)
    if info.status.is_terminal():
        say(f"{job_id} already {info.status.value}; nothing to stop")
        return 0
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    while not info.status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    if not info.status.is_terminal():
        say(f"{job_id}: stop requested, still {info.status.value} after {wait_s:.0f}s")
        return 1
    say(f"{job_id}: {info.status.value}")
    return 0
