"""Resources: one spelling for every stage, resolved against the cluster's nodes, refused when unplaceable."""

import pytest

from raydist.config import FinetuneConfig, GenerateConfig, ServeConfig, SweepConfig
from raydist.config.base import ResourceSettings
from raydist.config.loading import ConfigError, config_from_dict
from raydist.core.preflight import PreflightError
from raydist.core.resources import SKIP_CHECK_ENV, plan_units

FT = {"model": {"path": "tiny-random"}, "data": {"train": {"builtin": "pydoc_topics"}}, "run": {"name": "x"}}
CPU_NODES = [{"id": "head", "resources": {"CPU": 2}}, {"id": "w1", "resources": {"CPU": 3}}]
GPU_NODES = [{"id": "head", "resources": {"CPU": 2}}, {"id": "w1", "resources": {"CPU": 3, "GPU": 4}}]


@pytest.mark.parametrize(
    "cls,data,old,new",
    [
        (FinetuneConfig, {**FT, "scaling": {"use_gpu": True}}, "scaling.use_gpu", "resources.num_gpus"),
        (FinetuneConfig, {**FT, "scaling": {"cpus_per_worker": 2}}, "scaling.cpus_per_worker", "resources.num_cpus"),
        (
            SweepConfig,
            {"model": {"path": "tiny-random"}, "run": {"name": "s"}, "search": {"gpus_per_trial": 0.5}},
            "search.gpus_per_trial",
            "resources.num_gpus",
        ),
        (
            SweepConfig,
            {"model": {"path": "tiny-random"}, "run": {"name": "s"}, "device": "cpu"},
            "device",
            "resources.device",
        ),
        (ServeConfig, {"artifact": "a", "resources": {"use_gpu": True}}, "resources.use_gpu", "resources.num_gpus"),
        (
            GenerateConfig,
            {"model": {"path": "tiny-random"}, "prompts": {"path": "p.jsonl"}, "output": "o.jsonl", "use_gpu": False},
            "use_gpu",
            "resources.num_gpus",
        ),
    ],
)
def test_renamed_keys_name_the_new_spelling(cls, data, old, new):
    with pytest.raises(ConfigError) as e:
        config_from_dict(cls, data)
    assert f"{old} was renamed: use {new}" in str(e.value)


def test_every_stage_spells_resources_the_same_way():
    spec = {"num_cpus": 0.5, "num_gpus": 0.25, "device": "cpu"}
    sweep = config_from_dict(SweepConfig, {"model": {"path": "tiny-random"}, "run": {"name": "s"}, "resources": spec})
    serve = config_from_dict(ServeConfig, {"artifact": "a", "resources": {**spec, "torch_threads": 2}})
    gen = config_from_dict(
        GenerateConfig,
        {"model": {"path": "tiny-random"}, "prompts": {"path": "p.jsonl"}, "output": "o.jsonl", "resources": spec},
    )
    for cfg in (sweep, serve, gen):
        assert (cfg.resources.num_cpus, cfg.resources.num_gpus, cfg.resources.device) == (0.5, 0.25, "cpu")


def test_training_workers_need_whole_gpus():
    with pytest.raises(ConfigError, match="whole GPUs"):
        config_from_dict(FinetuneConfig, {**FT, "resources": {"num_gpus": 0.5}})
    assert config_from_dict(FinetuneConfig, {**FT, "resources": {"num_gpus": 2}}).resources.num_gpus == 2


def test_negative_gpus_refused():
    with pytest.raises(ValueError, match="num_gpus must be >= 0"):
        ResourceSettings(num_gpus=-1)


def test_auto_gpus_follow_the_cluster_not_the_driver():
    auto = ResourceSettings()
    assert plan_units(auto, 2, "worker", nodes=CPU_NODES).num_gpus == 0
    plan = plan_units(auto, 2, "worker", nodes=GPU_NODES)  # a CPU-only head with a GPU node
    assert plan.num_gpus == 1 and plan.computes_on_gpu
    assert plan_units(auto, 8, "worker", nodes=GPU_NODES).num_gpus == 0  # not one GPU per unit
    forced_cpu = plan_units(ResourceSettings(device="cpu"), 2, "worker", nodes=GPU_NODES)
    assert forced_cpu.num_gpus == 0 and not forced_cpu.computes_on_gpu


def test_gpus_asked_of_a_cluster_without_any_are_refused():
    with pytest.raises(PreflightError, match="the cluster has no GPUs"):
        plan_units(ResourceSettings(num_gpus=1), 2, "training worker", nodes=CPU_NODES)
    with pytest.raises(PreflightError, match="device is 'cuda'"):
        plan_units(ResourceSettings(device="cuda"), 1, "trial", nodes=CPU_NODES)


def test_a_unit_larger_than_every_node_is_refused():
    with pytest.raises(PreflightError, match="no node of the cluster has that much"):
        plan_units(ResourceSettings(num_cpus=4, num_gpus=0), 1, "sweep trial", nodes=CPU_NODES)
    with pytest.raises(PreflightError, match="no node"):
        plan_units(ResourceSettings(num_gpus=8), 1, "sweep trial", nodes=GPU_NODES)


def test_fractional_gpus_fit_several_units_per_gpu():
    plan = plan_units(ResourceSettings(num_cpus=0.25, num_gpus=0.5, device="cpu"), 8, "sweep trial", nodes=GPU_NODES)
    assert plan.ray_resources() == {"CPU": 0.25, "GPU": 0.5} and not plan.computes_on_gpu


def test_strict_spread_needs_a_node_per_worker():
    plan_units(ResourceSettings(num_gpus=0), 2, "worker", placement_strategy="STRICT_SPREAD", nodes=CPU_NODES)
    with pytest.raises(PreflightError, match="STRICT_SPREAD"):
        plan_units(ResourceSettings(num_gpus=0), 3, "worker", placement_strategy="STRICT_SPREAD", nodes=CPU_NODES)


def test_placement_check_can_be_skipped_for_autoscaling_clusters(monkeypatch):
    monkeypatch.setenv(SKIP_CHECK_ENV, "1")
    assert plan_units(ResourceSettings(num_gpus=1), 2, "worker", nodes=CPU_NODES).num_gpus == 1
