"""raydist on a real two-node Ray cluster (``ray_cluster``: a CPU-only head with 2 CPUs and a worker node with
3 CPUs and 4 *declared* GPUs, both started with ``ray start`` on this machine), driven through the CLI in
subprocesses that join it through ``RAY_ADDRESS``, as a user's commands would.

- a fine-tune whose two workers run on different nodes (STRICT_SPREAD), killed on one node and resumed by
  Ray Train from the last checkpoint, exports an artifact plain ``transformers`` loads;
- a compression sweep whose trials land on both nodes;
- that artifact served with a replica on each node, both answering through Serve's proxy;
- a sweep with 0.5 GPU per trial runs 8 trials at once on the 4 declared GPUs, each seeing its own GPU id
  and computing on the CPU by an explicit ``resources.device: cpu``; with ``device: auto`` it fails clearly;
- what cannot be placed (GPUs on a cluster without any, a worker larger than every node) is refused first.

Every directory the stages write is local: both nodes run on this machine, so a local path is storage that
every node reaches (the URI storage tests are tests/integration/test_storage.py).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from raydist.core.artifact import read_manifest
from raydist.core.progress import read_history

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TINY_LORA = str(REPO / "jobs" / "tiny_lora.yaml")
SWEEP_TINY = str(REPO / "jobs" / "sweep_tiny.yaml")

# A short run that checkpoints, loses a worker and resumes: checkpoint at step 2, the last rank hard-exits at
# step 4 (raydist.train.worker._maybe_fault), Ray Train restarts the group from step 2. Why the eval report
# at step 3 (eval_every=1): Ray Train 2.60 registers a checkpoint only when its controller next polls the
# workers (every 2 s); a rank that dies before that loses it (scripts/ray_bugs/
# train_v2_checkpoint_lost_when_worker_dies.py). A worker's next report waits until its previous one was
# taken, so once step 3's report returned, step 2's checkpoint is registered and the resume point is certain.
FT_STEPS, FT_CKPT_STEP, FT_FAULT_STEP = 4, 2, 4
FINETUNE_ARGS = [
    "scaling.num_workers=2",
    "scaling.placement_strategy=STRICT_SPREAD",
    "resources.num_gpus=0",
    "resources.num_cpus=1",
    f"train.max_steps={FT_STEPS}",
    f"train.checkpoint_every={FT_CKPT_STEP}",
    "train.eval_every=1",
    "train.eval_at_start=false",
    "data.max_eval_sequences=8",
    "run.max_failures=1",
]
# Sweeps measure as little as still exercises every part of a trial: one eval budget (so no ASHA: every
# trial runs to the end), one short latency measurement, and a policy any candidate meets.
FAST_SWEEP_ARGS = [
    "eval.budgets=[512]",
    "eval.window=256",
    "eval.data.max_tokens=512",
    "eval.calibration_sequences=4",
    "eval.latency_repeats=1",
    "eval.latency_batch_sizes=[1]",
    "eval.latency_new_tokens=4",
    "policy.max_quality_loss_pct=1000",
]


def run_cli(args: list[str], cluster, log: Path, timeout: float = 900, **env: str) -> tuple[int, str, float]:
    """``python -m raydist ARGS`` against ``cluster``; returns (exit status, console output, seconds)."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "raydist", *args],
            cwd=REPO,
            env=cluster.subprocess_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    return proc.returncode, log.read_text(errors="replace"), time.monotonic() - t0


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report_rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "sweep_report.json").read_text())["trials"]


# ------------------------------------------------------------------------------------------ fine-tune


@pytest.fixture(scope="module")
def spread_finetune(ray_cluster, tmp_path_factory):
    """The 2-worker STRICT_SPREAD fine-tune with the fault drill, run once for the module."""
    tmp = tmp_path_factory.mktemp("multinode-ft")
    marker = tmp / "fault_marker"
    rc, out, seconds = run_cli(
        ["finetune", "-c", TINY_LORA, *FINETUNE_ARGS, f"run.output_dir={tmp}", "run.name=spread"],
        ray_cluster,
        tmp / "finetune.log",
        RAYDIST_FAULT_AT_STEP=str(FT_FAULT_STEP),
        RAYDIST_FAULT_MARKER=str(marker),
    )
    return {"rc": rc, "out": out, "seconds": seconds, "run_dir": tmp / "spread", "marker": marker}


def test_finetune_spreads_over_both_nodes_and_survives_losing_one(spread_finetune, ray_cluster):
    ft = spread_finetune
    assert ft["rc"] == 0, tail(ft["out"])
    run_dir = ft["run_dir"]
    history = read_history(run_dir / "metrics.jsonl")
    placements = [h for h in history if h.get("event") == "workers"]
    cluster_nodes = set(ray_cluster.node_ids.values())

    # First start: one rank per node (STRICT_SPREAD), on nodes of this cluster.
    assert len(placements) == 2, placements  # the first start and the one restart
    for placement in placements:
        by_rank = {w["rank"]: w for w in placement["workers"]}
        assert sorted(by_rank) == [0, 1]
        assert by_rank[0]["node_id"] != by_rank[1]["node_id"], placement
        assert {w["node_id"] for w in by_rank.values()} == cluster_nodes
        assert all(w["device"] == "cpu" and w["gpu_ids"] == "" for w in by_rank.values()), placement

    # The drill killed the last rank once; which node that was is recorded (Ray Train picks the ranks' nodes).
    assert marker_text(ft["marker"]) == f"killed rank 1 at step {FT_FAULT_STEP}"
    first, second = ({w["rank"]: w for w in p["workers"]} for p in placements)
    killed_on = next(name for name, nid in ray_cluster.node_ids.items() if nid == first[1]["node_id"])
    print(
        f"\nthe killed rank 1 ran on the {killed_on} node ({first[1]['node_id'][:12]}); "
        f"finetune took {ft['seconds']:.0f}s"
    )

    # Ray Train restarted the whole group (new processes) and it resumed from the step-2 checkpoint.
    assert {w["pid"] for w in first.values()}.isdisjoint(w["pid"] for w in second.values())
    resumed = [h for h in history if h.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [FT_CKPT_STEP], resumed
    assert history.index(placements[0]) < history.index(resumed[0]) < history.index(placements[1])
    assert placements[1]["step"] == FT_CKPT_STEP
    steps_after_restart = [h["step"] for h in history[history.index(placements[1]) :] if "tokens_per_s" in h]
    assert steps_after_restart == list(range(FT_CKPT_STEP + 1, FT_STEPS + 1))

    # It finished: the artifact loads with plain transformers and says how many steps it trained.
    import torch
    from transformers import AutoModelForCausalLM

    artifact = run_dir / "artifact"
    assert read_manifest(artifact)["metrics"]["steps"] == FT_STEPS
    model = AutoModelForCausalLM.from_pretrained(artifact)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def marker_text(marker: Path) -> str:
    assert marker.is_file(), "the fault drill never fired"
    return marker.read_text().strip()


# ---------------------------------------------------------------------------------------------- serve


def test_serve_puts_a_replica_on_each_node(spread_finetune, ray_cluster, tmp_path):
    assert spread_finetune["rc"] == 0, "needs the fine-tune's artifact"
    port = free_port()
    # Serve starts an HTTP proxy on every node; both bind 127.0.0.1:port here (Serve sets SO_REUSEPORT).
    log = tmp_path / "serve.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "raydist",
                "serve",
                str(spread_finetune["run_dir"] / "artifact"),
                "num_replicas=2",
                "max_replicas_per_node=1",
                "resources.num_cpus=0.5",
                "resources.num_gpus=0",
                f"http.port={port}",
                "http.host=127.0.0.1",
                "health.check_period_s=30",
            ],
            cwd=REPO,
            env=ray_cluster.subprocess_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            # Ready = the CLI says it serves (it then handles SIGTERM; during the deploy, Ray's own handler
            # would exit with status 15) and a replica answers /ready.
            deadline = time.monotonic() + 600
            while True:
                assert proc.poll() is None, f"raydist serve exited with {proc.returncode}:\n{tail(log.read_text())}"
                assert time.monotonic() < deadline, f"not ready after 600 s:\n{tail(log.read_text())}"
                if "[raydist] serving model" in log.read_text(errors="replace"):
                    try:
                        if client.get("/ready").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                time.sleep(1)
            ready_s = time.monotonic() - t0

            # /stats is answered by the replica the request was routed to. Serve's router prefers a replica on
            # the proxy's own node, so each request opens a new connection: the kernel then spreads them over
            # the two proxies (SO_REUSEPORT), and each node's proxy reaches its own node's replica.
            seen: dict[str, int] = {}
            for _ in range(60):
                r = httpx.get(f"{base}/stats", timeout=60)
                assert r.status_code == 200, r.text
                seen[r.json()["node_id"]] = r.json()["pid"]
                if len(seen) == 2:
                    break
            assert set(seen) == set(ray_cluster.node_ids.values()), seen

            model_id = client.get("/v1/models").json()["data"][0]["id"]
            r = client.post("/v1/completions", json={"model": model_id, "prompt": "def f", "max_tokens": 4})
            assert r.status_code == 200, r.text
            body = r.json()
            assert isinstance(body["choices"][0]["text"], str) and 1 <= body["usage"]["completion_tokens"] <= 4
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, tail(log.read_text())
    # SIGTERM deleted the application (the cluster's Serve controller stays, as on any shared cluster).
    apps = httpx.get(
        f"{ray_cluster.dashboard_url}/api/serve/applications/", headers=ray_cluster.auth_headers, timeout=30
    ).json()["applications"]
    assert "raydist" not in apps, apps
    print(f"\nserve: ready after {ready_s:.0f}s, replicas on {len(seen)} nodes (pids {sorted(seen.values())})")


# ---------------------------------------------------------------------------------------------- sweeps


def test_sweep_trials_land_on_both_nodes(ray_cluster, tmp_path):
    # 2 CPUs per trial: the head holds one trial, the worker node (3 CPUs) one more, so the two trials that
    # start together are on different nodes. Every candidate really computes (none is the unchanged base,
    # which finishes at once): Tune reuses a finished trial's actor for the next one, so a trial that ended
    # before the second one's actor was up would take the second trial onto its own node.
    rc, out, seconds = run_cli(
        [
            "sweep",
            "-c",
            SWEEP_TINY,
            "resources.num_gpus=0",
            "resources.num_cpus=2",
            "search.max_concurrent=2",
            "search_space.method=[magnitude,wanda]",
            "search_space.quantization=[none,int8_dynamic]",
            *FAST_SWEEP_ARGS,
            f"run.output_dir={tmp_path}",
            "run.name=both-nodes",
        ],
        ray_cluster,
        tmp_path / "sweep.log",
    )
    assert rc == 0, tail(out)
    rows = report_rows(tmp_path / "both-nodes")
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows), rows
    assert {r["node_id"] for r in rows} == set(ray_cluster.node_ids.values()), [
        (r["node_id"][:8], r["started_at"], r["reported_at"]) for r in rows
    ]
    assert all(r["device"] == "cpu" and r["gpu_ids"] == "" for r in rows)
    print(f"\nsweep on both nodes: {seconds:.0f}s")


def test_sweep_runs_8_trials_at_once_on_4_declared_gpus(ray_cluster, tmp_path):
    rc, out, seconds = run_cli(
        [
            "sweep",
            "-c",
            SWEEP_TINY,
            "resources.num_gpus=0.5",
            "resources.device=cpu",
            "resources.num_cpus=0.25",
            "search.max_concurrent=8",
            "search.asha=false",
            "search_space.method=[magnitude,wanda]",
            "search_space.sparsity=[0.25,0.5]",
            "search_space.quantization=[none,int8_dynamic]",
            *FAST_SWEEP_ARGS,
            f"run.output_dir={tmp_path}",
            "run.name=gpus",
        ],
        ray_cluster,
        tmp_path / "sweep.log",
    )
    assert rc == 0, tail(out)
    rows = report_rows(tmp_path / "gpus")
    assert len(rows) == 8 and all(r["status"] == "completed" for r in rows), rows
    # All eight ran at once: their [started, last report] intervals share an instant.
    latest_start, earliest_end = max(r["started_at"] for r in rows), min(r["reported_at"] for r in rows)
    assert latest_start < earliest_end, [(r["started_at"], r["reported_at"]) for r in rows]
    # Each saw exactly one GPU id, the one CUDA_VISIBLE_DEVICES names; each GPU held two trials (0.5 each).
    for r in rows:
        assert r["gpu_ids"] in {"0", "1", "2", "3"} and r["cuda_visible_devices"] == r["gpu_ids"], r
        assert r["node_id"] == ray_cluster.node_ids["worker"], r  # the only node with GPUs
        assert r["device"] == "cpu", r  # resources.device: cpu computes on the CPU though GPUs were given
    per_gpu = {g: sum(r["gpu_ids"] == g for r in rows) for g in "0123"}
    assert per_gpu == {"0": 2, "1": 2, "2": 2, "3": 2}, per_gpu
    print(
        f"\n8 trials on 4 declared GPUs: {seconds:.0f}s, all 8 running together for {earliest_end - latest_start:.1f}s"
    )


def test_sweep_on_declared_gpus_without_cuda_fails_clearly_with_device_auto(ray_cluster, tmp_path):
    # The base model is measured on a trial's resources before any trial starts, so that is where the unit
    # first learns that Ray gave it a GPU that torch cannot see.
    rc, out, seconds = run_cli(
        [
            "sweep",
            "-c",
            SWEEP_TINY,
            "resources.num_gpus=0.5",
            "resources.device=auto",
            "resources.num_cpus=0.25",
            "search.max_concurrent=1",
            "search_space.method=[magnitude]",
            "search_space.quantization=[none]",
            *FAST_SWEEP_ARGS,
            f"run.output_dir={tmp_path}",
            "run.name=auto",
        ],
        ray_cluster,
        tmp_path / "sweep.log",
    )
    assert rc != 0, tail(out)
    assert "torch sees no CUDA device" in out and "resources.device: cpu" in out, tail(out)
    assert not (tmp_path / "auto" / "trials").exists() and not (tmp_path / "auto" / "sweep_report.json").exists()
    print(f"\ndevice auto on declared GPUs refused in {seconds:.0f}s")


# ------------------------------------------------------------------------------------------- preflight


def test_finetune_asking_for_gpus_on_a_cluster_without_any_is_refused(tmp_path):
    """In-process, against the session's local CPU-only Ray (``ray_session``)."""
    from raydist.config import load_stage_config
    from raydist.core.preflight import PreflightError
    from raydist.train.finetune import run_finetune

    cfg = load_stage_config(TINY_LORA, ["resources.num_gpus=1", f"run.output_dir={tmp_path}", "run.name=gpu"])
    t0 = time.monotonic()
    with pytest.raises(PreflightError, match=r"num_gpus.*no GPUs"):
        run_finetune(cfg, verbose=False)
    assert time.monotonic() - t0 < 60
    assert not list(tmp_path.rglob("checkpoint_*")) and not list(tmp_path.rglob("metrics.jsonl"))


def test_finetune_worker_larger_than_every_node_is_refused_quickly(ray_cluster, tmp_path):
    rc, out, seconds = run_cli(
        ["finetune", "-c", TINY_LORA, "resources.num_gpus=8", f"run.output_dir={tmp_path}", "run.name=too-big"],
        ray_cluster,
        tmp_path / "finetune.log",
        timeout=300,
    )
    assert rc == 2, tail(out)
    assert "no node of the cluster has that much" in out and "'GPU': 8.0" in out, tail(out)
    assert seconds < 90, f"took {seconds:.0f}s"  # seconds: it never waits for Ray to place anything
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.name != "finetune.log")
    assert written == [], f"a refused run wrote {written}"
