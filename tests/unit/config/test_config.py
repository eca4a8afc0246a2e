from pathlib import Path

import pytest

from raydist.config import ConfigError, FinetuneConfig, load_config
from raydist.config.loading import apply_overrides, config_from_dict, dump_config

REPO = Path(__file__).resolve().parents[3]
BASE = {
    "model": {"path": "tiny-random"},
    "data": {"train": {"builtin": "pydoc_topics"}},
    "run": {"name": "t"},
}


def test_minimal_config_gets_defaults():
    cfg = config_from_dict(FinetuneConfig, BASE)
    assert cfg.deepspeed.zero_stage == 2 and cfg.lora.enabled is False and cfg.scaling.num_workers == 2


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown field"):
        config_from_dict(FinetuneConfig, {**BASE, "optim": {"lrr": 1e-4}})


def test_every_bad_field_is_listed():
    with pytest.raises(ConfigError) as e:
        config_from_dict(FinetuneConfig, {**BASE, "train": {"micro_batch_size": 0}, "optim": {"lr": -1}})
    assert "train.micro_batch_size" in str(e.value) and "optim.lr" in str(e.value)


def test_dotted_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(config_from_dict(FinetuneConfig, BASE)))
    cfg = load_config(FinetuneConfig, p, ["optim.lr=1e-4", "lora.target_modules=[q_proj,v_proj]", "lora.enabled=true"])
    assert cfg.optim.lr == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.enabled is True


def test_override_typo_fails_at_load(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(config_from_dict(FinetuneConfig, BASE)))
    with pytest.raises(ConfigError, match=r"train\.max_step: unknown field"):
        load_config(FinetuneConfig, p, ["train.max_step=3"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["optim.lr"])


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"optim": {"warmup_steps": 3, "warmup_fraction": 0.1}}, "can't provide both warmup_steps and warmup_fraction"),
        ({"deepspeed": {"zero_stage": 2, "offload_params": True}}, "offload_params needs zero_stage 3"),
        ({"deepspeed": {"zero_stage": 0, "offload_optimizer": True}}, "offload_optimizer needs zero_stage >= 1"),
        ({"data": {"train": {"builtin": "pydoc_topics", "path": "x.jsonl"}}}, "exactly one of `path` or `builtin`"),
        ({"data": {"train": {"builtin": "pydoc_topics"}, "eval_fraction": 1.5}}, "eval_fraction"),
        ({"train": {"max_steps": 5}, "optim": {"warmup_steps": 5}}, "must be below train.max_steps"),
        ({"lora": {"target_modules": []}}, "at least one module"),
        ({"run": {"name": "a/b"}}, "run.name"),
        ({"model": {"path": "tiny-random", "tiny": {"hidden_size": 30, "num_heads": 4}}}, "not divisible"),
    ],
)
def test_contradictions_rejected(patch, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(FinetuneConfig, {**BASE, **patch})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(FinetuneConfig, "/nonexistent/c.yaml")


@pytest.mark.parametrize("job", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_jobs_are_valid_configs(job):
    from raydist.config import load_stage_config

    cfg = load_stage_config(job)
    import yaml

    assert cfg.stage == yaml.safe_load(job.read_text())["stage"]


def test_stage_dispatch_rejects_unknown_stage(tmp_path):
    from raydist.config import load_stage_config

    p = tmp_path / "c.yaml"
    p.write_text("stage: deploy\n")
    with pytest.raises(ConfigError, match="unknown stage 'deploy'"):
        load_stage_config(p)
