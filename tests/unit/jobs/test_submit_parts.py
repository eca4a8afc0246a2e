"""`raydist submit`'s parts that need no cluster: the working_dir plan, address and token resolution."""

import json
import socket
import time

import pytest
import yaml

from raydist.cli import main
from raydist.config import load_stage_config
from raydist.config.loading import apply_overrides, read_yaml
from raydist.jobs.plan import (
    JOB_CONFIG,
    MAX_SHIPPED_MODEL_BYTES,
    SubmitError,
    entrypoint,
    plan_job,
    runtime_env,
    stage_working_dir,
    submission_id,
)
from raydist.jobs.submit import connect, find_token, resolve_address


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plan_for(tmp_path, data, stage="finetune"):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    raw = read_yaml(spec)
    return plan_job(stage, raw, load_stage_config(spec, default_stage=stage), base=tmp_path)


def finetune_spec(**sections):
    data = {
        "stage": "finetune",
        "model": {"path": "tiny-random"},
        "data": {"train": {"path": "data/train.jsonl"}, "seq_len": 32},
        "run": {"name": "t", "output_dir": "/shared/runs"},
    }
    data.update(sections)
    return data


def test_local_files_are_shipped_and_paths_rewritten(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "hello"}])
    outside = write_jsonl(tmp_path.parent / f"{tmp_path.name}-elsewhere" / "eval.jsonl", [{"text": "bye"}])
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "notes.txt").write_text("x")
    data = finetune_spec(job={"files": ["extra"], "env": {"A": "1"}})
    data["data"]["eval"] = {"path": str(outside)}
    plan = plan_for(tmp_path, data)

    assert plan.data["data"]["train"]["path"] == "data/train.jsonl"  # inside the cwd: same relative path
    assert plan.data["data"]["eval"]["path"] == "external/0-eval.jsonl"  # outside it: under external/
    assert plan.data["job"]["files"] == ["extra"]
    assert plan.data["model"]["path"] == "tiny-random" and plan.data["run"]["output_dir"] == "/shared/runs"
    assert not plan.passed and not plan.remote_inputs

    wd = stage_working_dir(plan, tmp_path / "wd")
    assert (wd / "data" / "train.jsonl").read_text() == '{"text": "hello"}\n'
    assert (wd / "external" / "0-eval.jsonl").read_text() == '{"text": "bye"}\n'
    assert (wd / "extra" / "notes.txt").read_text() == "x"
    shipped = yaml.safe_load((wd / JOB_CONFIG).read_text())
    assert shipped["data"]["eval"]["path"] == "external/0-eval.jsonl"
    env = runtime_env(plan, wd)
    assert env["env_vars"] == {"A": "1", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"} and env["working_dir"] == str(wd)
    assert env["py_modules"][0].endswith("raydist") and "pip" not in env


def test_overrides_are_in_the_shipped_config(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "hello"}])
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(finetune_spec()))
    raw = apply_overrides(read_yaml(spec), ["optim.lr=0.01", "run.name=other"])
    plan = plan_job("finetune", raw, load_stage_config(spec, ["optim.lr=0.01", "run.name=other"]), base=tmp_path)
    assert plan.data["optim"]["lr"] == 0.01 and plan.run_name() == "other"


def test_uris_and_absent_paths_pass_through_with_a_note(tmp_path):
    data = finetune_spec(model={"path": "s3://bucket/models/base?endpoint_override=http://127.0.0.1:9000"})
    data["data"]["train"]["path"] = "/cluster/only/train.jsonl"
    plan = plan_for(tmp_path, data)
    assert plan.data["model"]["path"].startswith("s3://bucket/models/base")
    assert plan.data["data"]["train"]["path"] == "/cluster/only/train.jsonl"
    assert [r.dotted for r in plan.remote_inputs] == ["model.path", "data.train.path"]
    assert "model.path='s3://bucket" in plan.notes[0] and "data.train.path='/cluster/only/train.jsonl'" in plan.notes[0]
    assert not plan.shipped


def test_big_local_model_dir_is_refused(tmp_path):
    model = tmp_path / "big-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with open(model / "model.safetensors", "wb") as f:  # sparse: no disk used
        f.truncate(MAX_SHIPPED_MODEL_BYTES + 1)
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "hello"}])
    with pytest.raises(SubmitError, match=r"model.path: the local model .*big-model is over 100 MiB.*a URI"):
        plan_for(tmp_path, finetune_spec(model={"path": str(model)}))


def test_small_local_model_dir_is_shipped(tmp_path):
    model = tmp_path / "models" / "small"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "hello"}])
    plan = plan_for(tmp_path, finetune_spec(model={"path": "models/small"}))
    assert [(r.dotted, dest) for r, _, dest in plan.shipped] == [
        ("model.path", "models/small"),
        ("data.train.path", "data/train.jsonl"),
    ]


def test_missing_job_file_and_relative_output(tmp_path):
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "hello"}])
    with pytest.raises(SubmitError, match="job.files.0: nope.txt does not exist"):
        plan_for(tmp_path, finetune_spec(job={"files": ["nope.txt"]}))
    data = finetune_spec()
    data["run"]["output_dir"] = "runs"
    (note,) = plan_for(tmp_path, data).notes
    assert "run.output_dir='runs'" in note and "shared storage or a URI" in note


def test_nested_paths_in_a_sweep_of_finetuning_configs(tmp_path):
    """The walk finds paths wherever a config class nests (here: sweep.finetune.data.train)."""
    write_jsonl(tmp_path / "ft.jsonl", [{"text": "hello"}])
    data = {
        "stage": "sweep",
        "target": "finetune",
        "run": {"name": "s", "output_dir": "/shared"},
        "finetune": finetune_spec(data={"train": {"path": "ft.jsonl"}, "seq_len": 32}),
        "finetune_space": {"lr": [1e-3, 1e-4]},
    }
    plan = plan_for(tmp_path, data, stage="sweep")
    assert [(r.dotted, dest) for r, _, dest in plan.shipped] == [("finetune.data.train.path", "ft.jsonl")]


def test_entrypoint_and_submission_id():
    expected = "'/opt/py env/bin/python' -m raydist finetune -c raydist_job.yaml"
    assert entrypoint("finetune", "/opt/py env/bin/python") == expected
    assert entrypoint("serve", "python") == "python -m raydist serve raydist_job.yaml"
    sid = submission_id("finetune", "tiny lora/x")
    assert sid.startswith("raydist-finetune-tiny-lora-x-") and len(sid.rsplit("-", 1)[1]) == 8
    assert sid != submission_id("finetune", "tiny lora/x")


def test_address_resolution(monkeypatch):
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_address() == ("http://127.0.0.1:8265", "default")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address: not the job server
    assert resolve_address()[0] == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert resolve_address() == ("http://head:8265", "RAY_ADDRESS")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://jobs.example:443")
    assert resolve_address() == ("https://jobs.example:443", "RAY_API_SERVER_ADDRESS")
    assert resolve_address("other:8265") == ("http://other:8265", "--address")
    with pytest.raises(SubmitError, match="not an http"):
        resolve_address("ray://head:10001")


def test_token_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_token() == (None, None)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert find_token() == ("home-token", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "tok").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert find_token()[0] == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert find_token() == ("env-token", "RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SubmitError, match="RAY_AUTH_TOKEN_PATH=.*missing cannot be read"):
        find_token()


def test_unreachable_address_fails_fast_naming_it():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(SubmitError, match=f"cannot reach the Ray job server at http://127.0.0.1:{port}"):
        connect(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5


def test_submit_refuses_a_wrong_stage_and_an_invalid_spec_before_any_cluster(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(finetune_spec()))
    # The address is unreachable: reaching it would be a different error than the ones asserted here.
    assert main(["submit", "distill", "-c", str(spec), "--address", "http://127.0.0.1:9"]) == 2
    assert "is a 'finetune' config; submit it with `raydist submit finetune`" in capsys.readouterr().err
    assert main(["submit", "finetune", "-c", str(spec), "optim.lrr=1", "--address", "http://127.0.0.1:9"]) == 2
    submit_err = capsys.readouterr().err
    assert main(["validate", "-c", str(spec), "optim.lrr=1"]) == 2
    validate_err = capsys.readouterr().err
    assert "optim.lrr: unknown field" in submit_err
    assert submit_err.replace("raydist submit:", "raydist validate:") == validate_err


def test_a_shipped_model_is_found_in_this_nodes_copy_of_the_working_dir(tmp_path, monkeypatch):
    """The job's driver (head) makes a shipped model's path absolute inside its own unpacked working_dir; a
    worker on another node finds the same file in its node's copy (same package name, on its PYTHONPATH)."""
    from raydist.config.base import ModelConfig
    from raydist.core.models import resolve_model_source
    from raydist.core.storage import on_this_node

    pkg = "runtime_resources/working_dir_files/_ray_pkg_0123abcd"
    head_path = str(tmp_path / "head-session" / pkg / "models" / "small")  # not on this "node"
    here = tmp_path / "worker-session" / pkg
    (here / "models" / "small").mkdir(parents=True)
    (here / "models" / "small" / "config.json").write_text("{}")
    monkeypatch.setenv("PYTHONPATH", f"/elsewhere:{here}")
    assert on_this_node(head_path) == str(here / "models" / "small")
    assert resolve_model_source(ModelConfig(path=head_path)).path == str((here / "models" / "small").resolve())
    # paths outside a working_dir, and ones that exist as given, are left alone
    assert on_this_node(str(tmp_path / "models" / "small")) == str(tmp_path / "models" / "small")
    assert on_this_node(str(here / "models" / "small")) == str(here / "models" / "small")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert on_this_node(head_path) == head_path  # not shipped here either: the loader's own error follows
