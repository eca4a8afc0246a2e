"""Storage on a real S3 API: a moto server on loopback (its own process-level HTTP server, no patched client).

Every path a fine-tune writes goes to ``s3://bucket/runs?endpoint_override=...``: the driver is killed once
the bucket holds a checkpoint, the same command resumes from the bucket, and the artifact is served straight
from the bucket (by the session's Ray).
"""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from raydist.core import storage

pytestmark = pytest.mark.integration
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with one bucket; yields the base URI of a prefix in it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=f"http://{host}:{port}", allow_bucket_creation=True)
    fs.create_dir("raydist-test")
    yield f"s3://raydist-test/runs?endpoint_override=http://{host}:{port}"
    server.stop()


def cli_env():
    """The CLI starts its own embedded Ray (a Ray temp dir of its own), so killing it kills its whole Ray:
    a driver killed while connected to a cluster without a dashboard would leave Ray Train's (detached)
    placement group behind, since Ray Train's cleaner needs the state API to see that the driver died."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    return {**env, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rds-", dir="/tmp")}


def finetune_cmd(output_dir: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "raydist",
        "finetune",
        "-c",
        "jobs/tiny_lora.yaml",
        f"run.output_dir={output_dir}",
        "run.name=s3-lora",
        "train.max_steps=8",
        "train.checkpoint_every=2",
        "train.eval_every=8",
        "scaling.num_workers=2",
        "resources.num_gpus=0",
    ]


def checkpoints(run_uri: str) -> list[str]:
    """The checkpoints Ray Train has recorded as complete in the bucket (its snapshot names them)."""
    snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")
    if not storage.is_file(snapshot):
        return []
    import re

    return sorted(set(re.findall(r"checkpoint_[0-9_.-]+", storage.read_text(snapshot))))


@pytest.fixture(scope="module")
def trained(s3):
    """The fine-tune, killed after its first checkpoint reached the bucket, then resumed by the same command."""
    repo = REPO
    run_uri = storage.join(s3, "s3-lora")
    first = subprocess.Popen(
        finetune_cmd(s3),
        cwd=repo,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not checkpoints(run_uri) and first.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, "the first run ended before it checkpointed:\n" + first.stdout.read()
    os.killpg(first.pid, signal.SIGKILL)  # the driver dies hard; its Ray Train job goes with it
    first.wait()
    killed_at = checkpoints(run_uri)
    second = subprocess.run(finetune_cmd(s3), cwd=repo, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"run": run_uri, "killed_at": killed_at, "out": second.stdout + second.stderr}


def test_killed_finetune_resumes_from_the_bucket(trained, tmp_path):
    run = trained["run"]
    assert trained["killed_at"], "the bucket held no checkpoint when the driver was killed"
    assert "resumed from step" in trained["out"], trained["out"][-4000:]
    assert "Reporting training result" not in trained["out"]  # Ray Train's records are hidden without --verbose
    history = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
    resumed = [h for h in history if h.get("event") == "resumed"]
    assert resumed and resumed[0]["step"] >= 2
    assert max(h["step"] for h in history if "loss" in h) == 8
    for name in (
        "config.yaml",
        "data/train.parquet",
        "data/fingerprint.txt",
        "loss_curve.png",
        "artifact/raydist.json",
        "artifact/config.json",
        "artifact/adapter/adapter_config.json",
    ):
        assert storage.is_file(storage.join(run, name)), name
    assert not os.path.exists(os.path.join(REPO, "runs", "s3-lora")), "nothing may go to a local run directory"
    # the artifact in the bucket loads with plain transformers
    from transformers import AutoModelForCausalLM

    local = storage.download(storage.join(run, "artifact"), tmp_path / "artifact")
    model = AutoModelForCausalLM.from_pretrained(local)
    assert sum(p.numel() for p in model.parameters()) > 0
    # a third run of the same command is refused: the run in the bucket is complete
    again = subprocess.run(
        finetune_cmd(storage.parent_of(run)), env=cli_env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert again.returncode == 2 and "already complete" in again.stderr


def test_artifact_served_straight_from_the_bucket(trained):
    from ray import serve

    from raydist.config import ServeConfig
    from raydist.core.runs import free_port
    from raydist.serve.app import run_serve

    port = free_port()
    cfg = ServeConfig(
        artifact=storage.join(trained["run"], "artifact"),
        app_name="s3served",
        http={"port": port},
        resources={"num_cpus": 0.25, "num_gpus": 0},
    )
    url = run_serve(cfg, blocking=False, verbose=False)
    try:
        models = httpx.get(f"{url}/models", timeout=60).json()
        assert models["data"][0]["id"] == "s3-lora"  # the run name, from the URI
        r = httpx.post(f"{url}/completions", json={"model": "s3-lora", "prompt": "def", "max_tokens": 4}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        serve.delete("s3served")
        serve.shutdown()  # the next module starts Serve with a proxy on its own port


def test_unreachable_storage_is_refused_before_anything_starts():
    bad = "s3://nobucket/runs?endpoint_override=http://127.0.0.1:9&connect_timeout=1&request_timeout=1"
    t0 = time.time()
    r = subprocess.run(finetune_cmd(bad), env=cli_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2 and "run.output_dir" in r.stderr and "127.0.0.1:9" in r.stderr
    assert time.time() - t0 < 60


def test_a_last_hidden_teacher_cache_in_the_bucket(s3, tmp_path):
    """A teacher cache on S3 (kd.cache_dir): the shards, the manifest and a last_hidden cache's output layer go
    to the bucket, the workers train from there (3 steps), and the next run with the same key reuses it."""
    cache = storage.join(s3, "teacher-cache-lh")
    cmd = [
        sys.executable,
        "-m",
        "raydist",
        "distill",
        "-c",
        "jobs/tiny_distill.yaml",
        f"run.output_dir={tmp_path}",
        "kd.teacher_mode=cache",
        "kd.cache_entries=last_hidden",
        "kd.ce_weight=0.0",
        f"kd.cache_dir={cache}",
        "train.max_steps=3",
        "train.eval_every=3",
        "train.checkpoint_every=null",
        "resources.num_gpus=0",
    ]
    first = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    manifest = json.loads(storage.read_text(storage.join(cache, "cache.json")))
    assert manifest["key"]["entries"] == "last_hidden" and manifest["rows"] > 0
    assert storage.is_file(storage.join(cache, "head.safetensors")) and manifest["head_bytes"] > 0
    history = map(json.loads, (tmp_path / "tiny-distill" / "metrics.jsonl").open())
    losses = [h["loss"] for h in history if "tokens_per_s" in h]
    assert len(losses) == 3 and all(x > 0 for x in losses)
    again = subprocess.run(
        cmd + ["run.name=again"], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing teacher cache" in again.stdout + again.stderr
