"""`raydist pipeline` end to end on the session's local Ray: the shipped tiny spec (LoRA fine-tune → pruned-student
distillation → 4-candidate sweep → Serve), in this process, as the CLI runs it.

One chain, shared by the tests in order: a first run stops inside the fine-tune (``run.stop_after_steps``: the
pre-emption drill), the second resumes it and runs every later stage, ending with a real HTTP request to the
served sweep winner; a third run skips every finished stage.
"""

import json
import socket
from pathlib import Path

import openai
import pytest

from raydist.config import load_stage_config
from raydist.core.artifact import read_manifest
from raydist.core.progress import read_history
from raydist.jobs.pipeline import run_pipeline

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobs" / "pipeline_tiny.yaml"
PRODUCERS = ("finetune", "distill", "sweep")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    # the session Ray has 4 CPUs: 2 training workers, or 2 sweep trials, then a small replica; 2 of the 4
    # sweep candidates keep the file short (dense and int8 dynamic: the winner is the quantized one)
    overrides = [
        f"output_dir={out}",
        f"serve.http.port={_free_port()}",
        "serve.resources.num_cpus=0.5",
        "serve.health.check_period_s=2",
        "sweep.search_space.method=[none]",
    ]
    return {
        "out": out,
        "overrides": overrides,
        "dir": out / "pipeline-tiny",
        "cfg": lambda *extra: load_stage_config(SPEC, [*overrides, *extra]),
    }


def _lineage(chain) -> dict:
    return json.loads((chain["dir"] / "lineage.json").read_text())


def test_interrupted_stage_stops_the_chain_and_is_recorded(chain):
    lineage_at = run_pipeline(chain["cfg"]("finetune.run.stop_after_steps=3"), serve_blocking=False)
    assert Path(lineage_at) == chain["dir"] / "lineage.json"
    stages = _lineage(chain)["stages"]
    assert [stages[s]["status"] for s in ("finetune", "distill", "sweep", "serve")] == [
        "stopped",
        "pending",
        "pending",
        "pending",
    ]
    assert not (chain["dir"] / "finetune" / "artifact").exists()


def test_rerun_resumes_the_stage_and_runs_the_chain_to_a_served_model(chain):
    from raydist.serve.engine import BatchGenerator, GenerationRequest, SamplingParams
    from raydist.serve.loading import load_served_model

    run_pipeline(chain["cfg"](), serve_blocking=False)
    lineage = _lineage(chain)
    stages = lineage["stages"]
    assert lineage["spec"]["name"] == "pipeline-tiny" and set(stages) == {"finetune", "distill", "sweep", "serve"}
    # the fine-tune continued from its step-3 checkpoint instead of starting over
    assert stages["finetune"]["resumed"] is True
    history = read_history(chain["dir"] / "finetune" / "metrics.jsonl")
    assert [h["step"] for h in history if h.get("event") == "resumed"] == [3]
    for s in PRODUCERS:
        e = stages[s]
        art = chain["dir"] / s / "artifact"
        assert e["status"] == "done" and e["artifact"] == str(art) and e["wall_s"] > 0
        assert e["metrics"] == read_manifest(art)["metrics"] and e["bytes_on_disk"] > 0 and e["num_parameters"] > 0
    assert stages["finetune"]["metrics"]["eval_ppl"] > 0 and stages["distill"]["metrics"]["eval_ppl"] > 0
    assert stages["sweep"]["metrics"]["ppl"] > 0
    # every reference resolved to the producing stage's artifact, and each stage really started from it
    ft, ds, sw = (stages[s]["artifact"] for s in PRODUCERS)
    assert stages["distill"]["config"]["teacher"]["path"] == ft
    assert stages["distill"]["inputs"] == {"teacher.path": {"reference": "@finetune", "location": ft}}
    assert stages["sweep"]["config"]["model"]["path"] == ds and stages["serve"]["config"]["artifact"] == sw
    assert read_manifest(ds)["parent"]["path"] == ft and read_manifest(sw)["parent"]["path"] == ds
    assert stages["distill"]["num_parameters"] < stages["finetune"]["num_parameters"]  # the student is pruned
    assert read_manifest(sw)["candidate"]["quantization"] == "int8_dynamic"  # the smaller one within the policy

    # the served model is the sweep's winner: a real request through the unmodified openai client
    serve = stages["serve"]
    assert serve["status"] == "done" and serve["artifact"] == sw
    client = openai.OpenAI(base_url=serve["url"], api_key="unused", max_retries=0, timeout=60)
    try:
        assert [m.id for m in client.models.list().data] == ["pipeline-tiny"]
        done = client.completions.create(model="pipeline-tiny", prompt="def main():", max_tokens=6, temperature=0)
        model, tok, _ = load_served_model(sw, None, "cpu", "auto")
        local = BatchGenerator(model, tok).generate(
            [GenerationRequest(tok.encode("def main():"), SamplingParams(6, 0.0))]
        )[0]
        assert done.choices[0].text == local.text and done.usage.completion_tokens == local.completion_tokens == 6
    finally:
        from ray import serve as ray_serve

        ray_serve.delete(serve["app_name"])
        ray_serve.shutdown()  # later modules start Serve with a proxy on their own port


def test_rerun_skips_every_finished_stage(chain):
    manifests = {s: (chain["dir"] / s / "artifact" / "raydist.json").stat().st_mtime_ns for s in PRODUCERS}
    before = _lineage(chain)["stages"]
    try:
        run_pipeline(chain["cfg"](), serve_blocking=False)
        stages = _lineage(chain)["stages"]
        assert [stages[s]["status"] for s in PRODUCERS] == ["skipped-finished"] * 3
        for s in PRODUCERS:  # nothing was retrained or rewritten; the first run's figures are kept
            assert (chain["dir"] / s / "artifact" / "raydist.json").stat().st_mtime_ns == manifests[s]
            assert stages[s]["metrics"] == before[s]["metrics"] and stages[s]["wall_s"] == before[s]["wall_s"]
        assert stages["serve"]["status"] == "done"
        client = openai.OpenAI(base_url=stages["serve"]["url"], api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["pipeline-tiny"]
    finally:
        from ray import serve as ray_serve

        ray_serve.delete(chain["cfg"]().serve.app_name)
        ray_serve.shutdown()


def test_sweep_without_a_qualifying_candidate_exits_3_and_is_recorded(chain, tmp_path):
    """Through the CLI: a second pipeline reuses the chain's finished fine-tune (its run.output_dir) and sweeps
    one candidate that cannot meet a 0 % policy."""
    import yaml

    from raydist.cli import main

    spec = yaml.safe_load(SPEC.read_text())
    spec.update(name="strict", output_dir=str(tmp_path))
    spec["finetune"]["run"] = {"output_dir": str(chain["dir"])}
    spec.pop("distill"), spec.pop("serve")
    spec["sweep"].update(search_space={"method": ["magnitude"], "sparsity": [0.5]}, policy={"max_quality_loss_pct": 0})
    spec["sweep"]["eval"]["budgets"] = [2048]
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(spec))
    assert main(["pipeline", "-c", str(tmp_path / "strict.yaml")]) == 3
    stages = json.loads((tmp_path / "strict" / "lineage.json").read_text())["stages"]
    assert stages["finetune"]["status"] == "skipped-finished"
    assert stages["sweep"]["status"] == "failed" and stages["sweep"]["error"].startswith("NoCandidateMet")
    assert stages["sweep"]["config"]["model"]["path"] == str(chain["dir"] / "finetune" / "artifact")
