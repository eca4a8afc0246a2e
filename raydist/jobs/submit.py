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
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

from raydist.jobs.plan import JobPlan, SubmitError, entrypoint, runtime_env, stage_working_dir, submission_id

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


# ----------------------------------------------------------------------------------------- working_dir


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
