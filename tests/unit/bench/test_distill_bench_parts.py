"""The pure parts of ``scripts/bench/distill.py`` behind its on-policy rows and its generation metric: variant
parsing, the bootstrap intervals, the results keys, the BENCHMARKS.md section, and the metric itself on a tiny
model (the benchmark's full run takes about an hour and is not a test)."""

import copy
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("distill")


def test_variants_take_on_policy_keys(bench):
    v = bench.parse_variant("lmbda=0.5,op_loss=jsd,op_temperature=0.7,temperature=2,lr=1e-4")
    assert v == {"on_policy": {"lmbda": 0.5, "loss": "jsd", "temperature": 0.7}, "temperature": 2.0, "lr": 1e-4}
    assert bench.parse_variant("lmbda=1,op_start_step=15") == {"on_policy": {"lmbda": 1.0, "start_step": 15}}
    with pytest.raises(SystemExit, match="unknown key 'lambda'"):
        bench.parse_variant("lambda=1")


def test_bootstrap_intervals(bench):
    m = bench.bootstrap_mean([0.0, 1.0] * 20)
    assert m["mean"] == 0.5 and m["ci95_low"] < 0.5 < m["ci95_high"]
    assert bench.bootstrap_mean([0.3] * 10) == pytest.approx({"mean": 0.3, "ci95_low": 0.3, "ci95_high": 0.3})
    d = bench.paired_difference([0.5, 0.6, 0.7, 0.9], [0.4, 0.5, 0.6, 0.8])
    assert d["diff"] == pytest.approx(0.1) and d["above_zero"]
    assert not bench.paired_difference([0.5, 0.1], [0.1, 0.5])["above_zero"]
    # differences 0.3 and -0.1 alternating: mean 0.1, sd 0.214, so (1.96 * 0.214 / 0.1)^2 = 17.6 -> 18 instances
    spread = bench.paired_difference([0.3, -0.1] * 4, [0.0] * 8)
    assert spread["diff"] == pytest.approx(0.1) and spread["sd"] == pytest.approx(0.2138, abs=1e-4)
    assert spread["instances_to_resolve"] == 18 == math.ceil((1.96 * spread["sd"] / spread["diff"]) ** 2)
    assert bench.paired_difference([0.5, 0.1], [0.1, 0.5])["instances_to_resolve"] is None  # no difference
    with pytest.raises(ValueError, match="different lengths"):
        bench.paired_difference([1.0], [1.0, 2.0])


class Args:
    gen_max_new_tokens = 64


def test_generation_results_and_the_markdown_section(bench):
    scores = {
        "teacher": [0.5, 0.6, 0.4, 0.7],
        "ce": [0.2, 0.3, 0.1, 0.4],
        "offpolicy": [0.25, 0.3, 0.2, 0.4],
        "onpolicy1": [0.4, 0.5, 0.3, 0.6],
        "onpolicy0.5": [0.3, 0.4, 0.2, 0.5],
    }
    g = bench.generation_results(scores, Args())
    assert g["onpolicy_gen_run"] == "onpolicy1" and g["onpolicy_gen_goal_met"]
    assert g["ce_gen_score"] == pytest.approx(0.25) and g["offpolicy_gen_score"] == pytest.approx(0.2875)
    assert g["onpolicy_gen_score"] == pytest.approx(0.45)
    assert g["onpolicy_vs_ce_gen"]["diff"] == pytest.approx(0.2)
    r = copy.deepcopy(json.loads((REPO / "benchmarks" / "results" / "distill.json").read_text()))
    r["on_policy_runs"] = [
        {"lmbda": 1.0, "eval_ppl": r["kd_student_ppl"] * 1.01, "kd": {"on_policy": {"loss": "reverse_kl"}}}
    ]
    r.update(g)
    # the results file's generation comparison trains its own (mildly pruned) student: its rows say so
    assert r["generation_student"] and not r["generation_student"]["same_as_headline"]
    md = bench.markdown_section(r)
    assert "| generation student, on-policy KD (λ = 1, reverse_kl) |" in md
    assert "Generation metric: ROUGE-L F1" in md and "| generation student, on-policy KD (λ = 0.5) | 0.350 |" in md
    assert "Goal (beat both on this metric): met" in md
    # a comparison on the headline student (or a results file from before there was another) keeps plain labels
    md = bench.markdown_section({**r, "generation_student": None})
    assert "| student, on-policy KD (λ = 1, reverse_kl) |" in md
    assert "| student, on-policy KD (λ = 0.5) | 0.350 |" in md


def test_a_warm_started_on_policy_run_is_recorded_beside_the_goal_run(bench):
    """--op-warm-start: one more λ = 1 run after S off-policy steps, named apart from the protocol's runs, with
    its own paired differences; the goal stays decided by the protocol's λ = 1 run."""
    assert bench.op_key(1.0, 0, 0) == "onpolicy1" and bench.op_key(0.5, 0, 0) == "onpolicy0.5"
    assert bench.op_key(1.0, 15, 0) == "onpolicy1-from15"
    assert bench.op_label("onpolicy1-from15") == "λ = 1, from step 16" and bench.op_label("onpolicy0.5") == "λ = 0.5"
    scores = {
        "teacher": [0.5, 0.6, 0.4, 0.7],
        "ce": [0.2, 0.3, 0.1, 0.4],
        "offpolicy": [0.25, 0.3, 0.2, 0.4],
        "onpolicy1": [0.1, 0.2, 0.1, 0.3],
        "onpolicy1-from15": [0.4, 0.5, 0.3, 0.6],
    }
    g = bench.generation_results(scores, Args())
    assert g["onpolicy_gen_run"] == "onpolicy1" and not g["onpolicy_gen_goal_met"]
    warm = g["generation"]["other_onpolicy"]["onpolicy1-from15"]
    assert warm["vs_offpolicy"]["diff"] == pytest.approx(0.1625) and warm["vs_ce"]["diff"] == pytest.approx(0.2)
    r = copy.deepcopy(json.loads((REPO / "benchmarks" / "results" / "distill.json").read_text()))
    r.update(g)
    md = bench.markdown_section(r)
    assert "| generation student, on-policy KD (λ = 1, from step 16) | 0.450 |" in md
    assert f"On-policy KD (λ = 1, from step 16) − off-policy KD: {warm['vs_offpolicy']['diff']:+.3f} (" in md


def test_generation_metric_on_a_tiny_model(bench, tiny_tokenizer, tmp_path):
    from rouge_score import rouge_scorer

    from raydist.config import ModelConfig
    from raydist.core.models import load_model

    model_dir = tmp_path / "tiny"
    load_model(ModelConfig(path="tiny-random"), seed=0).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    evals = tmp_path / "eval.jsonl"
    records = [
        {"instruction": "Name a color.", "instances": [{"input": "", "output": "blue"}]},
        {
            "instruction": "Add the numbers.",
            "instances": [{"input": "1 and 2", "output": "3"}, {"input": "2, 2", "output": "4"}],
        },
    ]
    evals.write_text("".join(json.dumps(r) + "\n" for r in records))
    scores = bench.generation_scores({"tiny": str(model_dir)}, evals, max_new_tokens=4, batch=2)
    assert len(scores["tiny"]) == 3 and all(0.0 <= x <= 1.0 for x in scores["tiny"])
    # the scorer the metric uses: an answer equal to the reference scores 1, a disjoint one 0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert scorer.score("the blue sky", "the blue sky")["rougeL"].fmeasure == 1.0
    assert scorer.score("blue", "green")["rougeL"].fmeasure == 0.0
