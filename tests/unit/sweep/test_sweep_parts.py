"""The sweep's pure parts: config validation, candidate grid, structured plans, candidate application,
recovery, Pareto front and winner policy (no Ray here)."""

import itertools
import random

import pytest
import torch

from raydist.compress.candidate import (
    CandidateError,
    apply_candidate,
    block_parameter_split,
    distill_recover,
    structured_plan,
    token_rows,
)
from raydist.compress.pareto import choose_winner, dominates, pareto_front
from raydist.compress.unstructured import check_nm, prunable_linears
from raydist.config import ModelConfig
from raydist.config.loading import ConfigError, config_from_dict
from raydist.config.sweep import SweepConfig
from raydist.core.models import load_model

TINY = {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}


def tiny_model():
    return load_model(ModelConfig(path="tiny-random", tiny=TINY), seed=0).eval()


def sweep_cfg(**space):
    return config_from_dict(
        SweepConfig, {"model": {"path": "tiny-random"}, "search_space": space, "run": {"name": "s"}}
    )


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "space, needle",
    [
        ({"sparsity": [0.5, 1.0]}, "search_space.sparsity"),
        ({"sparsity": [-0.1]}, "search_space.sparsity"),
        ({"structured": [1.5]}, "search_space.structured"),
        ({"method": []}, "search_space.method is empty"),
        ({"quantization": []}, "search_space.quantization is empty"),
        ({"pattern": ["3:2"]}, "'3:2'"),
        ({"group_size": [48]}, "powers of two"),
        ({"quantization": ["int3"]}, "quantization"),
    ],
)
def test_bad_search_space_is_a_config_error_naming_the_field(space, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        sweep_cfg(**space)


def test_target_needs_its_fields():
    with pytest.raises(ConfigError, match="needs `model`"):
        config_from_dict(SweepConfig, {"run": {"name": "s"}})
    with pytest.raises(ConfigError, match="needs `finetune`"):
        config_from_dict(SweepConfig, {"target": "finetune", "run": {"name": "s"}})
    with pytest.raises(ConfigError, match="budgets"):
        config_from_dict(
            SweepConfig,
            {
                "model": {"path": "tiny-random"},
                "run": {"name": "s"},
                "eval": {"budgets": [1024, 8192], "data": {"builtin": "pydoc_topics", "max_tokens": 4096}},
            },
        )


def test_finetune_target_refuses_what_it_would_ignore():
    ft = {
        "model": {"path": "tiny-random"},
        "data": {"train": {"builtin": "pydoc_topics"}},
        "run": {"name": "f"},
    }
    base = {"target": "finetune", "run": {"name": "s"}, "finetune": ft, "finetune_space": {"lr": [1e-3]}}
    assert config_from_dict(SweepConfig, base).target == "finetune"
    for extra in ({"policy": {"max_quality_loss_pct": 5.0}}, {"eval": {}}, {"search_space": {"sparsity": [0.5]}}):
        with pytest.raises(ConfigError, match=f"does not use {next(iter(extra))}"):
            config_from_dict(SweepConfig, {**base, **extra})
    with pytest.raises(ConfigError, match="does not use model, recovery"):
        config_from_dict(SweepConfig, {**base, "model": {"path": "tiny-random"}, "recovery": {}})


def test_candidates_collapse_knobs_that_do_not_apply():
    cfg = sweep_cfg(
        method=["none", "wanda"],
        sparsity=[0.3, 0.5],
        pattern=[None, "2:4"],
        quantization=["none", "int8_dynamic", "int4_weight_only"],
        group_size=[32, 64],
    )
    cands = cfg.search_space.candidates()
    keys = [tuple(sorted((k, str(v)) for k, v in c.items())) for c in cands]
    assert len(keys) == len(set(keys))
    # none: 1 sparsity setting; wanda: 0.3, 0.5 and 2:4 (which implies 0.5) -> 1 + 3 = 4 pruning settings;
    # quantization: none, int8, int4 x 2 groups = 4 -> 16 distinct candidates (of 2*2*2*3*2 = 48 combinations)
    assert len(cands) == 16
    assert all(c["group_size"] is None for c in cands if c["quantization"] != "int4_weight_only")
    assert {c["sparsity"] for c in cands if c["pattern"] == "2:4"} == {0.5}


# ------------------------------------------------------------------------------------- structured


@pytest.mark.parametrize("structure", ["mlp", "layers", "mlp+heads"])
def test_structured_plan_removes_about_the_requested_share(structure):
    model = tiny_model()
    split = block_parameter_split(model.config)
    before = split["block"] * model.config.num_hidden_layers
    cand = {"method": "none", "structured": 0.25, "structure": structure, "quantization": "none"}
    report = apply_candidate(model, cand, calibration=torch.randint(0, 500, (4, 32)))
    after = block_parameter_split(model.config)["block"] * model.config.num_hidden_layers
    assert 0.15 < 1 - after / before < 0.35, (structure, 1 - after / before)
    assert report["structured"]["params_after"] < report["structured"]["params_before"]
    assert model(input_ids=torch.randint(0, 500, (1, 8))).logits.shape[-1] == model.config.vocab_size


def test_structured_plan_refuses_impossible_requests():
    cfg = tiny_model().config
    with pytest.raises(CandidateError, match="leave"):
        structured_plan(cfg, 0.9, "mlp")
    with pytest.raises(CandidateError, match="leaves none"):
        structured_plan(cfg, 0.95, "layers")


def test_apply_candidate_wanda_2of4_then_int8():
    model = tiny_model()
    calib = torch.randint(0, 500, (4, 32))
    ids = torch.randint(0, 500, (1, 16))
    report = apply_candidate(
        model,
        {"method": "wanda", "sparsity": 0.5, "pattern": "2:4", "structured": 0.0, "quantization": "none"},
        calibration=calib,
    )
    assert report["sparsity"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    for lin in prunable_linears(model).values():
        assert check_nm(lin.weight, 2, 4)
    report = apply_candidate(
        model, {"method": "none", "structured": 0.0, "quantization": "int8_dynamic"}, calibration=calib
    )
    assert report["quantization"]["quantized_layers"] == 4 * 7
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_distill_recovery_keeps_zeros_and_learns_the_teacher():
    teacher = tiny_model()
    student = tiny_model()
    apply_candidate(
        student,
        {"method": "magnitude", "sparsity": 0.6, "structured": 0.0, "quantization": "none"},
        calibration=torch.randint(0, 500, (2, 16)),
    )
    zeros = {n: (l.weight == 0).clone() for n, l in prunable_linears(student).items()}
    data = token_rows(torch.randint(0, 500, (1024,)).tolist(), 32)

    def kl_to_teacher():
        with torch.no_grad():
            t = torch.log_softmax(teacher(input_ids=data).logits, -1)
            s = torch.log_softmax(student(input_ids=data).logits, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    before = kl_to_teacher()
    rep = distill_recover(student, teacher, data, steps=30, batch_size=8, lr=1e-3)
    assert rep["steps"] == 30
    assert kl_to_teacher() < 0.7 * before
    for n, lin in prunable_linears(student).items():
        assert bool((lin.weight[zeros[n]] == 0).all()), n


# ------------------------------------------------------------------------------------------ pareto


def test_pareto_front_matches_the_definition_on_random_points():
    rng = random.Random(0)
    objectives = (("ppl", "min"), ("disk_bytes", "min"), ("tokens_per_s", "max"))
    for _ in range(20):
        pts = [
            {
                "ppl": rng.choice([10, 11, 12, 13]) + rng.random(),
                "disk_bytes": rng.randint(1, 5),
                "tokens_per_s": rng.randint(1, 5),
            }
            for _ in range(25)
        ]
        pts.append({"ppl": float("nan"), "disk_bytes": 0, "tokens_per_s": 99})  # never on the front
        front = set(pareto_front(pts, objectives))
        vec = [(p["ppl"], p["disk_bytes"], -p["tokens_per_s"]) for p in pts[:-1]]
        brute = {i for i, v in enumerate(vec) if not any(all(a <= b for a, b in zip(w, v)) and w != v for w in vec)}
        assert front == brute
        assert len(pts) - 1 not in front
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (2, 1)) and not dominates((1, 1), (1, 1))
    with pytest.raises(ValueError, match="direction"):
        pareto_front([{"ppl": 1}], (("ppl", "lowest"),))


def test_winner_policy():
    pts = [
        {"ppl": 10.2, "disk_bytes": 100, "tokens_per_s": 50},  # within 5 %, big
        {"ppl": 10.4, "disk_bytes": 40, "tokens_per_s": 30},  # within 5 %, smallest
        {"ppl": 10.3, "disk_bytes": 60, "tokens_per_s": 90},  # within 5 %, fastest
        {"ppl": 14.0, "disk_bytes": 10, "tokens_per_s": 200},  # too lossy
    ]
    assert choose_winner(pts, base_ppl=10.0, max_quality_loss_pct=5)[0] == 1
    assert choose_winner(pts, base_ppl=10.0, max_quality_loss_pct=5, prefer="fastest")[0] == 2
    i, reason = choose_winner(pts, base_ppl=10.0, max_quality_loss_pct=1)
    assert i is None and "no candidate met the policy" in reason and "10.2" in reason


def test_grid_product_counts():
    # the candidate grid is the product of the lists minus collapsed duplicates
    cfg = sweep_cfg(
        method=["magnitude", "wanda"],
        sparsity=[0.25, 0.5],
        quantization=["none", "int8_dynamic"],
        structured=[0.0, 0.25],
    )
    assert len(cfg.search_space.candidates()) == len(list(itertools.product([0, 1], [0, 1], [0, 1], [0, 1])))


def test_int4_algorithm_and_qat_collapse_where_they_do_not_apply():
    cfg = sweep_cfg(
        method=["none"],
        quantization=["none", "int8_dynamic", "int4_weight_only"],
        int4_algorithm=["minmax", "gptq"],
        recovery=["none", "qat"],
    )
    cands = cfg.search_space.candidates()
    # none / int8: int4_algorithm collapses and qat becomes distill, which has nothing to recover (no pruning)
    # -> 1 each; int4: 2 algorithms x {none, qat} -> 4
    assert len(cands) == 6
    assert all(
        c["int4_algorithm"] is None and c["recovery"] == "none"
        for c in cands
        if c["quantization"] != "int4_weight_only"
    )
    assert {(c["int4_algorithm"], c["recovery"]) for c in cands if c["quantization"] == "int4_weight_only"} == {
        ("minmax", "none"),
        ("minmax", "qat"),
        ("gptq", "none"),
        ("gptq", "qat"),
    }
    pruned = sweep_cfg(method=["wanda"], quantization=["int8_dynamic"], recovery=["qat"]).search_space.candidates()
    assert [c["recovery"] for c in pruned] == ["distill"]
    with pytest.raises(ConfigError, match="int4_algorithm"):
        sweep_cfg(int4_algorithm=["awq"])


def test_lm_head_and_smoothing_knobs_apply_to_the_int8_schemes_only(tiny_tokenizer):
    from raydist.compress.candidate import apply_candidate
    from raydist.compress.quant.layer import QuantizedLinear
    from raydist.config import ModelConfig
    from raydist.core.models import load_model

    cfg = sweep_cfg(
        quantization=["none", "int8_weight_only", "int8_dynamic", "int4_weight_only"],
        quantize_lm_head=[False, True],
        smoothing_alpha=[0.4, 0.5],
    )
    cands = cfg.search_space.candidates()
    by_scheme = {
        q: [c for c in cands if c["quantization"] == q]
        for q in ("none", "int8_weight_only", "int8_dynamic", "int4_weight_only")
    }
    assert [len(v) for v in by_scheme.values()] == [1, 2, 4, 1]  # head x alpha only where they apply
    assert all(c["smoothing_alpha"] is None for c in cands if c["quantization"] != "int8_dynamic")
    assert not any(c["quantize_lm_head"] for c in by_scheme["none"] + by_scheme["int4_weight_only"])
    with pytest.raises(ConfigError, match="smoothing_alpha"):
        sweep_cfg(smoothing_alpha=[1.5])
    # alpha 0 (no migration) is a value, not "unset"
    assert (
        sweep_cfg(quantization=["int8_dynamic"], smoothing_alpha=[0.0]).search_space.candidates()[0]["smoothing_alpha"]
        == 0.0
    )
    cand = next(c for c in by_scheme["int8_dynamic"] if c["quantize_lm_head"] and c["smoothing_alpha"] == 0.4)
    model = load_model(ModelConfig(path="tiny-random"), seed=0)
    report = apply_candidate(model, cand, calibration=torch.randint(4, 500, (2, 16)))
    assert isinstance(model.lm_head, QuantizedLinear) and report["quantization"]["include_lm_head"] is True
    assert report["quantization"]["smoothing"]["alpha"] == 0.4


def test_qat_recovery_trains_against_the_grid_the_int4_model_is_stored_on():
    from raydist.compress.quant.qat import fake_quantized, int4_grids
    from raydist.compress.quant.quantize import quantize_model, quantized_layers

    teacher = tiny_model()
    calib = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(1))
    data = token_rows(torch.randint(0, 500, (1024,), generator=torch.Generator().manual_seed(2)).tolist(), 32)

    def kl_to_teacher(model):
        with torch.no_grad():
            t = torch.log_softmax(teacher(input_ids=data).logits, -1)
            s = torch.log_softmax(model(input_ids=data).logits, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    base = {
        "method": "magnitude",
        "sparsity": 0.5,
        "structured": 0.0,
        "quantization": "int4_weight_only",
        "group_size": 32,
        "int4_algorithm": "minmax",
    }
    plain = tiny_model()
    apply_candidate(plain, dict(base, recovery="none"), calibration=calib)
    qat = tiny_model()
    rec = {"steps": 30, "batch_size": 8, "lr": 1e-3}
    report = apply_candidate(
        qat, dict(base, recovery="qat"), calibration=calib, teacher=teacher, recovery_ids=data, recovery=rec
    )
    assert report["recovery"]["qat_layers"] == 4 * 7 and report["qat_grid"]["scheme"] == "int4_weight_only"
    assert kl_to_teacher(qat) < 0.8 * kl_to_teacher(plain)
    assert {q.group_size for q in quantized_layers(qat).values()} == {32}
    # the stored int4 model computes exactly what the trained, fake-quantized float model computes
    model = tiny_model()
    grids, _ = int4_grids(model, group_size=32)
    distill_recover(model, teacher, data, steps=5, batch_size=8, lr=1e-3, grids=grids)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())  # plain Linears again
    with fake_quantized(model, grids), torch.no_grad():
        trained = model(input_ids=data[:2]).logits
    quantize_model(model, "int4_weight_only", group_size=32, int4_grids=grids)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=data[:2]).logits, trained, atol=1e-5)
    with pytest.raises(CandidateError, match="qat"):
        apply_candidate(
            tiny_model(),
            dict(base, quantization="int8_dynamic", recovery="qat"),
            calibration=calib,
            teacher=teacher,
            recovery_ids=data,
            recovery=rec,
        )


def test_asha_never_stops_a_candidate_that_still_meets_the_policy():
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler

    from raydist.sweep.tuning import policy_aware_asha

    def run(scheduler):
        actions = {}
        for tid, ppl in (("base-like", 10.0), ("int8-like", 10.07), ("bad", 30.0), ("worse", 40.0)):
            trial = SimpleNamespace(trial_id=tid)
            scheduler.on_trial_add(None, trial)
            actions[tid] = scheduler.on_trial_result(None, trial, {"training_iteration": 1, "ppl": ppl})
        return actions

    plain = run(
        ASHAScheduler(
            time_attr="training_iteration", metric="ppl", mode="min", max_t=3, grace_period=1, reduction_factor=2
        )
    )
    assert plain["int8-like"] == "STOP"  # what plain ASHA does to a candidate 0.7 % off the base
    ours = run(policy_aware_asha([10.5, 10.5, 10.5]))
    assert ours["int8-like"] == "CONTINUE" and ours["base-like"] == "CONTINUE"
    assert ours["bad"] == "STOP" and ours["worse"] == "STOP"


def test_every_searcher_samples_every_knob():
    """Optuna's space holds every knob of the search space (the int8 head and SmoothQuant alpha included), so
    values a user lists are searched, not replaced by the defaults normalize_candidate fills in."""
    from raydist.config.sweep import KNOBS
    from raydist.sweep.tuning import make_searcher as _search

    cfg = config_from_dict(
        SweepConfig,
        {
            "model": {"path": "tiny-random"},
            "search_space": {"quantization": ["int8_dynamic"], "quantize_lm_head": [True], "smoothing_alpha": [0.3]},
            "search": {"algorithm": "optuna", "num_samples": 2},
            "run": {"name": "s"},
        },
    )
    space, _, _, _ = _search(cfg, cfg.search_space.candidates())
    assert set(space["candidate"]) == set(KNOBS) == set(cfg.search_space.candidates()[0])
    assert space["candidate"]["quantize_lm_head"].categories == [True]
    assert space["candidate"]["smoothing_alpha"].categories == [0.3]
