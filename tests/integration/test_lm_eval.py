"""lm-evaluation-harness, unmodified, scores `raydist serve` with its `local-completions` backend (HTTP: echo +
logprobs for log-likelihoods, /tokenize for its remote tokenizer) exactly as its own `hf` backend scores the
same model in this process: a multiple-choice task and a generation task, custom task YAMLs over local JSONL
(tests/data/lm_eval, written for these tests), on the real SmolLM2-135M."""

import socket
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "lm_eval"
MODEL_ID = "smollm2-lmeval"

MC_TASK = """task: raydist_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
GEN_TASK = """task: raydist_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "raydist_mc.yaml").write_text(MC_TASK.format(data=DATA))
    (d / "raydist_gen.yaml").write_text(GEN_TASK.format(data=DATA))
    return d


@pytest.fixture(scope="module")
def served(smollm2_dir):
    from ray import serve

    from raydist.config import ServeConfig
    from raydist.serve.app import run_serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = run_serve(
        ServeConfig(
            artifact=str(smollm2_dir),
            model_name=MODEL_ID,
            app_name="lmeval",
            route_prefix="/lmeval",
            http={"port": port},
            resources={"num_cpus": 1},
        ),
        blocking=False,
        verbose=False,
    )
    yield url
    serve.shutdown()


def _evaluate(tasks_dir, model: str, model_args: dict):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["raydist_mc", "raydist_gen"],
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        batch_size=4,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    samples = {task: sorted(out["samples"][task], key=lambda s: s["doc_id"]) for task in out["samples"]}
    return out["results"], samples


def test_lm_eval_scores_the_server_as_its_hf_backend_scores_the_model(served, smollm2_dir, tasks_dir):
    http_results, http_samples = _evaluate(
        tasks_dir,
        "local-completions",
        {
            "base_url": f"{served}/completions",
            "model": MODEL_ID,
            "num_concurrent": 1,
            "max_retries": 1,
            "tokenized_requests": True,
        },
    )
    hf_results, hf_samples = _evaluate(
        tasks_dir, "hf", {"pretrained": str(smollm2_dir), "dtype": "float32", "device": "cpu"}
    )
    # multiple choice: every choice's log-likelihood, and so the accuracy
    served_ll = [[r[0] for r in s["filtered_resps"]] for s in http_samples["raydist_mc"]]
    local_ll = [[r[0] for r in s["filtered_resps"]] for s in hf_samples["raydist_mc"]]
    assert len(served_ll) == 16
    for a, b in zip(served_ll, local_ll):
        assert a == pytest.approx(b, abs=1e-3)
    assert http_results["raydist_mc"]["acc,none"] == hf_results["raydist_mc"]["acc,none"]
    assert hf_results["raydist_mc"]["acc,none"] > 0.5  # a real model answers most of these (chance is 0.25)
    # generation: the same greedy continuations
    served_gen = [s["filtered_resps"][0] for s in http_samples["raydist_gen"]]
    assert served_gen == [s["filtered_resps"][0] for s in hf_samples["raydist_gen"]]
    assert http_results["raydist_gen"]["exact_match,none"] == hf_results["raydist_gen"]["exact_match,none"]
