"""`raydist submit` / `raydist jobs` against a real two-node Ray cluster (`ray start`, token auth on).

Everything goes through the CLI in a subprocess, as a user runs it (exit codes of `--follow` included).
The two finishing jobs are submitted at the start of the module and run side by side while the other
tests go on (the box has 2 cores; their run time, not CPU, is what overlapping saves).
"""

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The job's entrypoint must run this venv's interpreter: the cluster's PATH `python` may have no Ray.
PY = sys.executable
FAST = ["train.max_steps=3", "train.checkpoint_every=3", "data.max_eval_sequences=4", "resources.num_gpus=0"]
# resources.num_gpus=0: the worker node *declares* 4 GPUs, so `auto` would give every worker a (fake) GPU.


def raydist(args, env, timeout=240):
    return subprocess.run(
        [PY, "-m", "raydist", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def submit_cmd(out_dir, *extra):
    return [
        PY,
        "-m",
        "raydist",
        "submit",
        "finetune",
        "-c",
        "jobs/tiny_lora.yaml",
        f"run.output_dir={out_dir}",
        *FAST,
        *extra,
        "--python",
        PY,
    ]


def job_id_of(stdout: str) -> str:
    m = re.search(r"\[raydist\] submitted job (\S+) to ", stdout)
    assert m, stdout
    return m.group(1)


def job_info(cluster, job_id: str) -> dict:
    r = requests.get(f"{cluster.dashboard_url}/api/jobs/{job_id}", headers=cluster.auth_headers, timeout=10)
    r.raise_for_status()
    return r.json()


def all_jobs(cluster) -> list[dict]:
    r = requests.get(f"{cluster.dashboard_url}/api/jobs/", headers=cluster.auth_headers, timeout=10)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def finishing_jobs(ray_cluster, tmp_path_factory):
    """Start (in the background) a tiny fine-tune that succeeds and one that dies remotely."""
    root = tmp_path_factory.mktemp("submit")
    # A local data file outside the repo: it must travel in the working_dir (its path is rewritten to
    # external/0-train.jsonl, which exists only inside the job's working_dir).
    from pydoc_data.topics import topics

    train = root / "data" / "train.jsonl"
    train.parent.mkdir()
    train.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:40]))
    env = ray_cluster.subprocess_env()
    ok = subprocess.Popen(
        submit_cmd(root / "out", f"data.train={{path: {train}}}", "scaling.num_workers=1", "--follow"),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Fails on the cluster only: the fault drill kills the worker at step 1 and run.max_failures=0 allows no
    # restart. Locally the spec is valid (the drill's variables exist only in the job's env).
    failing = subprocess.Popen(
        submit_cmd(
            root / "out",
            "run.name=tiny-fault",
            "run.max_failures=0",
            "scaling.num_workers=1",
            "job.env.RAYDIST_FAULT_AT_STEP='1'",
            f"job.env.RAYDIST_FAULT_MARKER={root / 'fault.marker'}",
            "--follow",
        ),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    jobs = {"ok": ok, "failing": failing, "root": root, "train": train}
    yield jobs
    for p in (ok, failing):
        if p.poll() is None:
            p.kill()


def finish(proc, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"`raydist submit --follow` still running after {timeout}s:\n{out[-6000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def test_invalid_spec_is_refused_before_submitting(ray_cluster):
    env = ray_cluster.subprocess_env()
    bad = ["optim.lrr=1", "run.name=never-submitted"]
    submitted = raydist(["submit", "finetune", "-c", "jobs/tiny_lora.yaml", *bad], env)
    validated = raydist(["validate", "-c", "jobs/tiny_lora.yaml", *bad], env)
    assert submitted.returncode == validated.returncode == 2
    assert "optim.lrr: unknown field" in submitted.stderr
    assert submitted.stderr.replace("raydist submit:", "raydist validate:") == validated.stderr
    # A spec pydantic accepts but the local checks refuse (the model has no such module), same message.
    bad = ["lora.target_modules=[c_attn]", "run.name=never-submitted"]
    submitted = raydist(["submit", "finetune", "-c", "jobs/tiny_lora.yaml", *bad], env)
    validated = raydist(["validate", "-c", "jobs/tiny_lora.yaml", *bad], env)
    assert submitted.returncode == validated.returncode == 2
    assert "lora.target_modules ['c_attn'] match no module" in submitted.stderr
    assert submitted.stderr.replace("raydist submit:", "raydist validate:") == validated.stderr
    assert not [j for j in all_jobs(ray_cluster) if (j.get("metadata") or {}).get("raydist_run") == "never-submitted"]


def test_stop_a_running_job(ray_cluster, finishing_jobs, tmp_path):
    env = ray_cluster.subprocess_env()
    long = ["run.name=tiny-long", "scaling.num_workers=1", "train.max_steps=100000"]
    proc = subprocess.run(
        submit_cmd(tmp_path, *long, "train.checkpoint_every=null"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_of(proc.stdout)
    assert re.fullmatch(r"raydist-finetune-tiny-long-[0-9a-f]{8}", job_id)
    assert f"to {ray_cluster.dashboard_url}" in proc.stdout and f"the job runs with {PY}" in proc.stdout
    deadline = time.monotonic() + 120
    while job_info(ray_cluster, job_id)["status"] != "RUNNING":
        assert time.monotonic() < deadline, job_info(ray_cluster, job_id)
        time.sleep(0.5)
    stopped = raydist(["jobs", "stop", job_id], env)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{job_id}: STOPPED" in stopped.stdout
    assert job_info(ray_cluster, job_id)["status"] == "STOPPED"
    followed = raydist(["jobs", "logs", job_id, "--follow"], env)
    assert followed.returncode == 4 and f"job {job_id} STOPPED" in followed.stdout


def test_submit_follow_succeeds_and_the_artifact_loads(ray_cluster, finishing_jobs):
    rc, out, err = finish(finishing_jobs["ok"])
    assert rc == 0, out[-4000:] + err[-3000:]
    job_id = job_id_of(out)
    assert f"[raydist] job {job_id} SUCCEEDED" in out
    assert f"shipping {finishing_jobs['train']} as external/0-train.jsonl" in out
    artifact = finishing_jobs["root"] / "out" / "tiny-lora" / "artifact"
    manifest = json.loads((artifact / "raydist.json").read_text())
    assert manifest["stage"] == "finetune" and manifest["metrics"]["steps"] == 3
    # The job read the shipped copy: this relative path exists only inside the job's working_dir.
    assert manifest["config"]["data"]["train"]["path"] == "external/0-train.jsonl"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(artifact)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    # raydist travelled as a py_module (a package Ray uploaded), not from pip.
    runtime_env = job_info(ray_cluster, job_id)["runtime_env"]
    assert runtime_env["py_modules"][0].startswith("gcs://_ray_pkg_") and "pip" not in runtime_env


def test_a_job_that_fails_remotely(ray_cluster, finishing_jobs):
    rc, out, err = finish(finishing_jobs["failing"])
    assert rc == 1, out[-4000:] + err[-3000:]
    job_id = job_id_of(out)
    assert re.search(rf"\[raydist\] job {job_id} FAILED \(driver exit code 1\)", out)
    assert (finishing_jobs["root"] / "fault.marker").read_text().startswith("killed rank 0 at step 1")
    env = ray_cluster.subprocess_env()
    logs = raydist(["jobs", "logs", job_id], env)
    assert logs.returncode == 0
    assert "Traceback (most recent call last)" in logs.stdout
    assert "raydist finetune: training failed after 0 automatic restart(s)" in logs.stdout
    status = raydist(["jobs", "status", job_id], env)
    assert f"{job_id}: FAILED" in status.stdout and "driver exit code: 1" in status.stdout


def test_jobs_list_shows_them(ray_cluster, finishing_jobs):
    listed = raydist(["jobs", "list"], ray_cluster.subprocess_env())
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    by_run = {r[3]: r for r in rows.values() if r[0].startswith("raydist-finetune-")}
    assert by_run["tiny-lora"][1] == "SUCCEEDED" and by_run["tiny-fault"][1] == "FAILED"
    assert by_run["tiny-long"][1] == "STOPPED" and by_run["tiny-lora"][2] == "finetune"
    unknown = raydist(["jobs", "status", "raydist-nope"], ray_cluster.subprocess_env())
    assert unknown.returncode == 2
    assert f"no job 'raydist-nope' on the cluster at {ray_cluster.dashboard_url}" in unknown.stderr


def test_unreachable_address_fails_within_seconds(ray_cluster):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    proc = raydist(
        [
            "submit",
            "finetune",
            "-c",
            "jobs/tiny_lora.yaml",
            "--address",
            f"http://127.0.0.1:{port}",
            "run.output_dir=/tmp/never",
        ],
        ray_cluster.subprocess_env(),
    )
    assert proc.returncode == 2
    assert f"cannot reach the Ray job server at http://127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60  # dominated by the CLI's imports and the local checks on a busy box


def test_token_missing_or_wrong(ray_cluster, tmp_path):
    env = ray_cluster.subprocess_env(HOME=str(tmp_path))  # no ~/.ray/auth_token there
    del env["RAY_AUTH_TOKEN_PATH"]
    proc = raydist(["jobs", "list"], env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"the cluster at {ray_cluster.dashboard_url} (from RAY_API_SERVER_ADDRESS) requires a token" in proc.stderr
    proc = raydist(["jobs", "list"], {**env, "RAY_AUTH_TOKEN": "not-the-token"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "the one from RAY_AUTH_TOKEN was rejected" in proc.stderr
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(ray_cluster.token)  # the default path, in a tmp HOME
    proc = raydist(["jobs", "list"], env)
    assert proc.returncode == 0 and proc.stdout.startswith("ID"), proc.stderr
