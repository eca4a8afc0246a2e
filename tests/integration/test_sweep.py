"""`raydist sweep` on a local Ray: a 6-candidate compression sweep of a tiny model with one deliberately
failing trial, the policy's "no candidate" outcome, and a 2-trial fine-tuning hyperparameter sweep."""

import json
from pathlib import Path

import pytest

from raydist.cli import EXIT_NO_WINNER, main
from raydist.compress.candidate import token_rows
from raydist.compress.quant.format import load_compressed
from raydist.compress.quant.quantize import quantized_layers
from raydist.core.artifact import read_manifest
from raydist.core.evaluation import perplexity_on

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_compress_sweep_with_a_failing_trial(tmp_path, monkeypatch):
    # One candidate is made to fail inside its trial; the sweep must record it and go on.
    monkeypatch.setenv("RAYDIST_SWEEP_FAIL", json.dumps({"method": "magnitude", "quantization": "int8_dynamic"}))
    assert main(["sweep", "-c", str(JOBS / "sweep_tiny.yaml"), f"run.output_dir={tmp_path}", "run.name=s1"]) == 0
    run = tmp_path / "s1"
    report = json.loads((run / "sweep_report.json").read_text())
    trials = report["trials"]
    assert len(trials) == 6
    failed = [t for t in trials if t["status"] == "failed"]
    assert len(failed) == 1 and "injected failure" in failed[0]["error"]
    assert failed[0]["candidate"]["method"] == "magnitude" and failed[0]["candidate"]["quantization"] == "int8_dynamic"
    done = [t for t in trials if t["status"] in ("completed", "stopped_early")]
    assert len(done) == 5
    completed = [t for t in trials if t["status"] == "completed"]
    # what each trial measured is real: sparsity where it pruned, smaller files where it quantized
    for t in completed:
        c = t["candidate"]
        if c["method"] != "none":
            assert t["sparsity"] > 0.25
        if c["quantization"] == "int8_dynamic":
            assert t["disk_bytes"] < 0.75 * report["base"]["disk_bytes"]
        assert t["tokens_per_s"] > 0 and t["ppl"] > 1
    # the front: no completed candidate dominates a front member
    front = [t for t in completed if t["pareto"]]
    assert front
    for f in front:
        for t in completed:
            assert not (
                t["ppl"] <= f["ppl"]
                and t["disk_bytes"] <= f["disk_bytes"]
                and t["tokens_per_s"] >= f["tokens_per_s"]
                and (t["ppl"], t["disk_bytes"], t["tokens_per_s"]) != (f["ppl"], f["disk_bytes"], f["tokens_per_s"])
            )
    # the winner: smallest within the policy, exported with lineage, reloads to the measured perplexity
    w = report["winner"]
    ok = [t for t in completed if t["ppl"] <= report["base"]["ppl"] * 1.25]
    assert w["disk_bytes"] == min(t["disk_bytes"] for t in ok)
    m = read_manifest(run / "artifact")
    assert m["stage"] == "sweep" and m["candidate"] == w["candidate"] and m["parent"]["hash"]
    model = load_compressed(run / "artifact")
    if w["candidate"]["quantization"] != "none":
        assert quantized_layers(model)
    from raydist.config import ModelConfig
    from raydist.core.data import pydoc_topics_text, text_token_stream
    from raydist.core.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(path="tiny-random"))
    windows = token_rows(text_token_stream([pydoc_topics_text()], tok, limit=2048), 256)
    assert perplexity_on(model, windows) == pytest.approx(w["ppl"], rel=1e-4)
    assert (run / "pareto.png").stat().st_size > 10_000
    # trial artifacts off the front were removed (keep_artifacts: pareto); the winner's copy is exported
    for t in completed:
        assert Path(t["artifact"]).exists() == t["pareto"]
    assert "task_answer_ppl" not in w  # no eval.task configured
    # the candidate that changes nothing is the base model: the driver's measurement stands for it
    (same,) = [t for t in trials if t["candidate"]["method"] == "none" and t["candidate"]["quantization"] == "none"]
    assert same["measured_as"] == "base" and same["ppl"] == report["base"]["ppl"]
    assert same["tokens_per_s"] == report["base"]["tokens_per_s"]
    # a finished sweep is not re-run
    assert main(["sweep", "-c", str(JOBS / "sweep_tiny.yaml"), f"run.output_dir={tmp_path}", "run.name=s1"]) == 2


def test_no_candidate_meets_the_policy(tmp_path, capsys):
    rc = main(
        [
            "sweep",
            "-c",
            str(JOBS / "sweep_tiny.yaml"),
            f"run.output_dir={tmp_path}",
            "run.name=s2",
            "search_space.method=[magnitude]",
            "search_space.sparsity=[0.9]",
            "search_space.quantization=[none]",
            "search.asha=false",
            "policy.max_quality_loss_pct=0.0",
        ]
    )
    err = capsys.readouterr().err
    assert rc == EXIT_NO_WINNER and "no candidate met the policy" in err
    report = json.loads((tmp_path / "s2" / "sweep_report.json").read_text())
    assert report["winner"] is None and report["counts"]["completed"] == 1
    assert not (tmp_path / "s2" / "artifact").exists()


def test_bad_sweep_config_fails_before_ray_work(tmp_path, capsys):
    rc = main(
        [
            "sweep",
            "-c",
            str(JOBS / "sweep_tiny.yaml"),
            f"run.output_dir={tmp_path}",
            "run.name=s3",
            "search_space.sparsity=[1.2]",
        ]
    )
    assert rc == 2 and "search_space.sparsity" in capsys.readouterr().err
    rc = main(
        [
            "sweep",
            "-c",
            str(JOBS / "sweep_tiny.yaml"),
            f"run.output_dir={tmp_path}",
            "run.name=s4",
            "search_space.structured=[0.9]",
        ]
    )
    assert rc == 2 and "structured 0.9" in capsys.readouterr().err
    assert not (tmp_path / "s3").exists() and not (tmp_path / "s4").exists()
    rc = main(
        [
            "sweep",
            "-c",
            str(JOBS / "sweep_tiny.yaml"),
            f"run.output_dir={tmp_path}",
            "run.name=s5",
            "eval.task.builtin=pydoc_topics",
        ]
    )
    assert rc == 2 and "the task metric needs instruction" in capsys.readouterr().err


def test_finetune_hyperparameter_sweep(tmp_path, capsys):
    # 2 trials of 1 + 2 CPUs asked at once on the session's 4 CPUs would deadlock (each holds its trial CPU and
    # waits for its workers): the sweep runs them one at a time and says so
    assert (
        main(
            [
                "sweep",
                "-c",
                str(JOBS / "sweep_finetune_tiny.yaml"),
                f"run.output_dir={tmp_path}",
                "search.max_concurrent=2",
            ]
        )
        == 0
    )
    assert "4 CPUs hold 1 trial(s) of 3 CPUs at once: running 1 at a time" in capsys.readouterr().out
    run = tmp_path / "sweep-finetune-tiny"
    report = json.loads((run / "sweep_report.json").read_text())
    assert [t["status"] for t in report["trials"]] == ["completed", "completed"]
    lrs = sorted(t["overrides"]["optim.lr"] for t in report["trials"])
    assert lrs == [1e-3, 3e-3]
    best = min(report["trials"], key=lambda t: t["eval_ppl"])
    assert report["winner"]["overrides"] == best["overrides"]
    m = read_manifest(run / "artifact")
    assert m["stage"] == "sweep" and m["overrides"] == best["overrides"]
    assert m["metrics"]["eval_ppl"] == pytest.approx(best["eval_ppl"])
    # each trial really trained: different learning rates give different models
    ppls = {t["overrides"]["optim.lr"]: t["eval_ppl"] for t in report["trials"]}
    assert ppls[1e-3] != ppls[3e-3]


def test_interrupted_sweep_resumes(tmp_path):
    """Kill the sweep's driver (and its private Ray) after two trials; the same command resumes it and
    does not redo finished trials."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [
        sys.executable,
        "-m",
        "raydist.cli",
        "sweep",
        "-c",
        str(JOBS / "sweep_tiny.yaml"),
        f"run.output_dir={tmp_path}",
        "run.name=r",
        "search.max_concurrent=1",
        "search.asha=false",
        "eval.latency_repeats=30",
    ]  # a few seconds per trial, so the kill lands mid-sweep
    log = tmp_path / "first.log"
    import tempfile

    # a private Ray for the driver we kill (short path: Ray's socket paths must stay under 108 bytes)
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r-", dir="/tmp"), "RAY_ADDRESS": ""}
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def saved_done() -> int:  # trials Tune's saved experiment state (every 2 s) holds as finished
        states = sorted((tmp_path / "r" / "tune" / "sweep").glob("experiment_state*.json"))
        try:
            data = json.loads(states[-1].read_text()) if states else {"trial_data": []}
        except (OSError, ValueError):  # caught mid-write
            return 0
        return sum(json.loads(t[0]).get("status") == "TERMINATED" for t in data["trial_data"])

    deadline = time.time() + 300
    while time.time() < deadline and saved_done() < 2 and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_first = {p.parent.name: p.stat().st_mtime for p in (tmp_path / "r" / "trials").glob("*/compression.json")}
    assert log.read_text().count(" done: ") >= 2, log.read_text()[-3000:]
    assert not (tmp_path / "r" / "sweep_report.json").exists()
    assert main(cmd[3:]) == 0  # in this process, on the session's Ray
    report = json.loads((tmp_path / "r" / "sweep_report.json").read_text())
    assert report["counts"]["completed"] == 6
    # trials finished before the kill are not re-run: their files are the ones the first driver wrote
    # (a trial killed mid-way may be redone)
    unchanged = [
        tid
        for tid, mtime in done_first.items()
        if (tmp_path / "r" / "trials" / tid / "compression.json").stat().st_mtime == mtime
    ]
    assert len(unchanged) >= 2, (done_first, unchanged)


def test_optuna_multi_objective_search(tmp_path):
    assert (
        main(
            [
                "sweep",
                "-c",
                str(JOBS / "sweep_tiny.yaml"),
                f"run.output_dir={tmp_path}",
                "run.name=o",
                "search.algorithm=optuna",
                "search.num_samples=3",
                "search.asha=false",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "o" / "sweep_report.json").read_text())
    assert len(report["trials"]) == 3 and report["counts"]["completed"] == 3
    space = {"none", "magnitude", "wanda"}
    assert all(t["candidate"]["method"] in space for t in report["trials"])
    assert report["winner"] is not None and (tmp_path / "o" / "artifact" / "raydist.json").is_file()


def test_int4_gptq_with_and_without_qat_and_a_task_metric(tmp_path):
    # int4 by GPTQ, once as is and once trained against its grid (QAT), through the CLI on a local Ray;
    # every candidate also gets the task metric on a small instruction set
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(json.dumps({"instruction": f"What is {i} plus {i}?", "output": f"{2 * i}."}) + "\n" for i in range(6))
    )
    assert (
        main(
            [
                "sweep",
                "-c",
                str(JOBS / "sweep_tiny.yaml"),
                f"run.output_dir={tmp_path}",
                "run.name=q",
                f"eval.task.path={tasks}",
                "eval.task_max_examples=4",
                "search_space.method=[none]",
                "search_space.quantization=[int4_weight_only]",
                "search_space.group_size=[32]",
                "search_space.int4_algorithm=[gptq]",
                "search_space.recovery=[none,qat]",
                "recovery.steps=4",
                "recovery.seq_len=64",
                "search.asha=false",
                "policy.max_quality_loss_pct=1000",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "q" / "sweep_report.json").read_text())
    trials = {t["candidate"]["recovery"]: t for t in report["trials"]}
    assert set(trials) == {"none", "qat"} and all(t["status"] == "completed" for t in trials.values())
    assert all(t["candidate"]["int4_algorithm"] == "gptq" for t in trials.values())
    applied = {}
    for path in (tmp_path / "q" / "trials").glob("*/compression.json"):
        done = json.loads(path.read_text())
        applied[done["candidate"]["recovery"]] = done
    assert "recovery" not in applied["none"] and applied["none"]["quantization"]["gptq"]["calibration_tokens"] > 0
    assert applied["qat"]["recovery"]["steps"] == 4 and applied["qat"]["recovery"]["qat_layers"] == 2 * 7
    assert applied["qat"]["qat_grid"]["int4_algorithm"] == "gptq"
    for t in trials.values():
        assert t["disk_bytes"] < 0.5 * report["base"]["disk_bytes"]
        assert t["task_answer_ppl"] > 1 and 0 <= t["task_token_accuracy"] <= 1
    assert report["base"]["task_examples"] == 4 and report["base"]["task_answer_ppl"] > 1
    assert (
        read_manifest(tmp_path / "q" / "artifact")["metrics"]["task_answer_ppl"] == report["winner"]["task_answer_ppl"]
    )
    model = load_compressed(tmp_path / "q" / "artifact")
    assert {q.scheme for q in quantized_layers(model).values()} == {"int4_weight_only"}
