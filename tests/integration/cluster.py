"""A real two-node Ray cluster on this machine, started with `ray start`, for tests that need one.

Why not ``ray.init()``: job submission needs the dashboard's job server, and multi-node tests need two
raylets (placement across nodes, a node that dies). ``ray.cluster_utils.Cluster`` runs its nodes inside
the test process; two ``ray start`` processes are what users run, token authentication included.

Layout (both nodes on 127.0.0.1, every port chosen free, so it never collides with another Ray on the box):

    head    --head, 2 CPUs, 0 GPUs, dashboard + job server, ~300 MB object store
    worker  3 CPUs, 4 GPUs *declared only* (for multi-GPU scheduling tests that compute on CPU; nothing
            here has CUDA), custom resource {"worker_node": 1} to pin work onto it

Token authentication is ON (``RAY_AUTH_MODE=token``) with a random token in ``<temp_dir>/auth_token``,
passed by ``RAY_AUTH_TOKEN_PATH`` — nothing is written to ``~/.ray``. Every file the cluster writes lives
under its own short temp dir (``/tmp/rdc-<pid>-<n>``, one subdirectory per node, ``head/`` and ``worker/``, as
on separate machines; Unix socket paths must stay < 100 chars).

Use it through the session-scoped pytest fixture ``ray_cluster`` (tests/integration/conftest.py); it is
started lazily by the first test that asks for it (~15 s) and stopped at the end of the session:

    def test_x(ray_cluster):
        ray_cluster.address        # "127.0.0.1:<gcs port>"  (RAY_ADDRESS for ray.init / drivers)
        ray_cluster.dashboard_url  # "http://127.0.0.1:<port>" (Jobs API, state API)
        ray_cluster.env            # env vars a subprocess needs: RAY_ADDRESS, RAY_API_SERVER_ADDRESS,
                                   # RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_TMPDIR
        ray_cluster.subprocess_env(EXTRA="1")  # os.environ + env (+ extras), minus a stray RAY_AUTH_TOKEN
        ray_cluster.node_ids       # {"head": <node id hex>, "worker": <node id hex>}
        ray_cluster.auth_headers   # {"Authorization": "Bearer <token>"} for raw HTTP calls
        ray_cluster.nodes()        # the state API's node records (alive ones)

Inside the test process, do not ``ray.init(address=ray_cluster.address)``: the integration suite's
autouse ``ray_session`` fixture already holds a local Ray in it (one Ray per process). Drive the cluster
through subprocesses (``raydist submit``, a ``python -c`` driver with ``env=ray_cluster.subprocess_env()``).

Stopping never uses ``ray stop`` (it kills every Ray on the machine, other people's too): ``stop()``
collects every process whose command line names this cluster's temp dir or GCS port, plus all their
descendants (workers, the dashboard's and runtime-env agents and ``ray.util.client.server`` rename their
command lines, so the tree is what finds them), sends SIGTERM, then SIGKILL to what is left.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil
import requests

_counter = itertools.count()

# Ports every `ray start` opens besides the GCS one. Each gets a free port of its own so that this cluster
# never collides with the defaults (8265, 52365, 10001 ...) of another Ray running on the same machine.
_HEAD_PORT_FLAGS = ("--dashboard-port", "--ray-client-server-port")
_NODE_PORT_FLAGS = (
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)
_WORKER_PORTS = 100  # a node's worker processes each listen on one port of its own range


class ClusterError(RuntimeError):
    """The cluster did not start (the message carries the `ray start` output / log tail)."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(n: int, lo: int = 20000, hi: int = 32000) -> tuple[int, int]:
    """A run of ``n`` consecutive ports that are all free now (for --min/--max-worker-port). The default
    span lies below Linux's ephemeral range (32768-60999, where :func:`free_ports` draws from), so a
    worker range never overlaps a port picked for another component."""
    rng = secrets.SystemRandom()
    for _ in range(50):
        start = rng.randrange(lo, hi - n)
        ok = True
        for port in range(start, start + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return start, start + n - 1
    raise ClusterError(f"no {n} consecutive free ports found in {lo}-{hi}")


class RayCluster:
    """A head and one worker node started with ``ray start``; see the module docstring for the API."""

    def __init__(
        self,
        head_cpus: int = 2,
        worker_cpus: int = 3,
        worker_gpus: int = 4,
        object_store_bytes: int = 300 * 1024**2,
        temp_dir: Optional[str] = None,
    ):
        self.temp_dir = Path(temp_dir or f"/tmp/rdc-{os.getpid()}-{next(_counter)}")
        self.head_cpus, self.worker_cpus, self.worker_gpus = head_cpus, worker_cpus, worker_gpus
        self.object_store_bytes = object_store_bytes
        self.token = secrets.token_hex(32)
        self.token_path = self.temp_dir / "auth_token"
        self.gcs_port: Optional[int] = None
        self.dashboard_port: Optional[int] = None
        self.node_ids: dict[str, str] = {}
        self._stopped = False

    # ------------------------------------------------------------------------------------------ API

    @property
    def address(self) -> str:
        """The GCS address ``host:port`` (what ``RAY_ADDRESS`` / ``ray.init(address=...)`` take)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard / Jobs API base URL."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables a subprocess needs to use this cluster (drivers, `raydist submit`)."""
        return {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_TMPDIR": str(self.temp_dir),
        }

    def subprocess_env(self, **extra: str) -> dict[str, str]:
        """``os.environ`` with :attr:`env` and ``extra`` on top, for ``subprocess.run(env=...)``.

        ``RAY_AUTH_TOKEN`` is dropped: it outranks ``RAY_AUTH_TOKEN_PATH`` in Ray's token lookup, so one
        left in the outer environment would silently replace this cluster's token.
        """
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
        env.update(self.env)
        env.update(extra)
        return env

    @property
    def auth_headers(self) -> dict[str, str]:
        """The header every request to this cluster's dashboard needs (token auth is on)."""
        return {"Authorization": f"Bearer {self.token}"}

    def nodes(self) -> list[dict]:
        """The alive nodes as the state API reports them (``node_id``, ``is_head_node``, ``resources_total``...)."""
        r = requests.get(
            f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100}, headers=self.auth_headers, timeout=10
        )
        r.raise_for_status()
        return [n for n in r.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    # ----------------------------------------------------------------------------------- start / stop

    def start(self, timeout_s: float = 90.0) -> "RayCluster":
        """Start head then worker and wait until both nodes are alive and the job server answers."""
        if self.temp_dir.exists():
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir.mkdir(parents=True)
        self.token_path.write_text(self.token)
        self.token_path.chmod(0o600)
        atexit.register(self.stop)  # a crashed or interrupted session still cleans up
        try:
            self._start_head()
            self._start_worker()
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _ray_start(self, args: list[str], what: str) -> None:
        # Every process of the node inherits this env. RAY_ADDRESS and the node's own RAY_TMPDIR matter to
        # Ray code that looks the cluster up with address=None (e.g. Ray Train's placement-group cleaner
        # calls the state API): on a machine running several Rays, auto-detection finds them all and fails.
        env = self.subprocess_env(RAY_TMPDIR=str(self.temp_dir / what))
        env.pop("RAY_API_SERVER_ADDRESS", None)
        ray = str(Path(sys.executable).with_name("ray"))
        proc = subprocess.run([ray, "start", *args], env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise ClusterError(
                f"`ray start` ({what}) failed with status {proc.returncode}:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )

    def _common_args(self, node: str) -> list[str]:
        ports = free_ports(len(_NODE_PORT_FLAGS))
        lo, hi = free_port_range(_WORKER_PORTS)
        # Each node gets its own temp dir, as separate machines would: with one shared dir both nodes' log
        # monitors tail the same worker logs and every worker line reaches the driver twice, and a path that
        # exists on one node only (a job's unpacked working_dir) would wrongly exist on the other too.
        args = [
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.temp_dir / node}",
            "--disable-usage-stats",
            f"--object-store-memory={self.object_store_bytes}",
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
        ]
        return args + [f"{flag}={port}" for flag, port in zip(_NODE_PORT_FLAGS, ports)]

    def _start_head(self) -> None:
        self.gcs_port, self.dashboard_port, client_port = free_ports(3)
        args = [
            "--head",
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={client_port}",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            f"--num-cpus={self.head_cpus}",
            "--num-gpus=0",
        ]
        self._ray_start(args + self._common_args("head"), "head")

    def _start_worker(self) -> None:
        args = [
            f"--address={self.address}",
            f"--num-cpus={self.worker_cpus}",
            f"--num-gpus={self.worker_gpus}",
            "--resources",
            json.dumps({"worker_node": 1}),
        ]
        self._ray_start(args + self._common_args("worker"), "worker")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            try:
                nodes = self.nodes()
                jobs = requests.get(f"{self.dashboard_url}/api/jobs/", headers=self.auth_headers, timeout=5)
                if len(nodes) == 2 and jobs.status_code == 200:
                    for n in nodes:
                        self.node_ids["head" if n["is_head_node"] else "worker"] = n["node_id"]
                    if set(self.node_ids) == {"head", "worker"}:
                        return
                last = f"{len(nodes)} node(s) alive, job server status {jobs.status_code}"
            except (requests.RequestException, KeyError, ValueError) as e:
                last = repr(e)
            time.sleep(0.5)
        raise ClusterError(f"cluster in {self.temp_dir} not ready after {timeout_s:.0f}s ({last})\n{self._log_tail()}")

    def _log_tail(self) -> str:
        logs = sorted(self.temp_dir.glob("*/session_latest/logs/*.err"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs[:8])

    def processes(self) -> list[psutil.Process]:
        """Every process this cluster started: those naming its temp dir or GCS port, and their descendants."""
        marks = [str(self.temp_dir)] + (
            [f"--gcs-address=127.0.0.1:{self.gcs_port}", f"--port={self.gcs_port}"] if self.gcs_port else []
        )
        found: dict[int, psutil.Process] = {}
        me = os.getpid()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or ())
            except (psutil.Error, TypeError):
                continue
            if proc.pid != me and any(m in cmd for m in marks):
                found[proc.pid] = proc
        for proc in list(found.values()):
            try:
                for child in proc.children(recursive=True):
                    if child.pid != me:
                        found[child.pid] = child
            except psutil.Error:
                pass
        return list(found.values())

    def stop(self) -> None:
        """Kill every process of this cluster (SIGTERM, then SIGKILL after 3 s) and delete its temp dir.

        The GCS server and a worker node's raylet (which keeps retrying the GCS) ignore SIGTERM for 10 s or
        more; a test cluster has nothing to save, so the grace period is short."""
        if self._stopped:
            return
        self._stopped = True
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
