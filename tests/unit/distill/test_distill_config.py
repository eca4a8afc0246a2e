import pytest

from raydist.config import ConfigError, DistillConfig
from raydist.config.loading import config_from_dict
from raydist.core.preflight import PreflightError, preflight_distill


def cfg(**over):
    data = {
        "teacher": {"path": "tiny-random"},
        "data": {"train": {"builtin": "pydoc_topics"}, "seq_len": 64},
        "run": {"name": "d"},
    }
    data.update(over)
    return config_from_dict(DistillConfig, data)


def test_defaults_prune_from_teacher_online():
    c = cfg()
    assert c.student.source == "pruned" and c.kd.teacher_mode == "online" and c.kd.loss == "forward_kl"


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"student": {"source": "pretrained"}}, "needs `path`"),
        ({"student": {"source": "config"}}, "needs `tiny`"),
        ({"student": {"source": "pruned", "path": "x"}}, "only used with source 'pretrained'"),
        ({"kd": {"teacher_mode": "cache", "hidden": {"weight": 1.0}}}, "needs the online teacher"),
        (
            {"kd": {"teacher_mode": "cache", "cache_entries": "sampled", "loss": "jsd"}},
            "unbiased gradient for kd.loss forward_kl only",
        ),
        (
            {"kd": {"teacher_mode": "cache", "cache_entries": "top_k_tail", "loss": "reverse_kl"}},
            "cache_entries top_k_tail gives an unbiased gradient",
        ),
        ({"kd": {"cache_tail_draws": 8}}, "applies to cache_entries top_k_tail only"),
        ({"kd": {"cache_entries": "top_k_tail", "top_k": 8, "cache_tail_draws": 8}}, "at least one exact"),
        ({"kd": {"beta": 1.5}}, "kd.beta"),
        ({"kd": {"temperature": 0}}, "kd.temperature"),
        ({"kd": {"lss": "jsd"}}, "kd.lss: unknown field"),
        ({"train": {"max_steps": 3}, "optim": {"warmup_steps": 3}}, "must be below train.max_steps"),
    ],
)
def test_bad_distill_configs(patch, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**patch)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_a_last_hidden_cache_serves_every_logit_loss(loss):
    """Its logits are the teacher's own, so unlike the drawn caches it takes any logit divergence; the
    hidden-state loss and ULD still need the online teacher."""
    c = cfg(kd={"teacher_mode": "cache", "cache_entries": "last_hidden", "loss": loss})
    assert c.kd.cache_entries == "last_hidden" and c.kd.tail_draws == 0
    with pytest.raises(ConfigError, match="needs the online teacher"):
        cfg(kd={"teacher_mode": "cache", "cache_entries": "last_hidden", "hidden": {"weight": 1.0}})
    with pytest.raises(ConfigError, match="kd.loss uld runs with the online teacher"):
        cfg(kd={"teacher_mode": "cache", "cache_entries": "last_hidden", "loss": "uld"})


def test_cache_head_dtype_is_a_last_hidden_setting():
    """The teacher output layer's precision in the workers: the training's by default, bfloat16 on request;
    refused for the caches that store log-probabilities (they have no output layer to run)."""
    import torch

    from raydist.distill.distill import kd_head_dtype

    c = cfg(kd={"teacher_mode": "cache", "cache_entries": "last_hidden", "cache_head_dtype": "bfloat16"})
    assert kd_head_dtype(c.kd.cache_head_dtype, bf16=False) == torch.bfloat16
    assert kd_head_dtype(None, bf16=False) == torch.float32 and kd_head_dtype(None, bf16=True) == torch.bfloat16
    assert kd_head_dtype("float32", bf16=True) == torch.float32
    with pytest.raises(ConfigError, match="cache_head_dtype applies to cache_entries last_hidden only"):
        cfg(kd={"teacher_mode": "cache", "cache_entries": "top_k", "cache_head_dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="cache_head_dtype"):
        cfg(kd={"teacher_mode": "cache", "cache_entries": "last_hidden", "cache_head_dtype": "float16"})


@pytest.mark.parametrize(
    "prune, message",
    [
        ({"drop_layers": 2}, "removes 2 of the teacher's 2 layers"),
        ({"drop_layers": [5]}, r"\[5\] are not layers of the teacher"),
        ({"kv_groups_keep": 3}, "exceeds the teacher's 2 KV heads"),
    ],
)
def test_impossible_pruning_is_refused_before_start(prune, message):
    with pytest.raises(PreflightError, match=message):
        preflight_distill(cfg(student={"source": "pruned", "prune": prune}))


def test_teacher_limits_seq_len():
    with pytest.raises(PreflightError, match="data.seq_len 4096 exceeds the models' limit of 512"):
        preflight_distill(cfg(data={"train": {"builtin": "pydoc_topics"}, "seq_len": 4096}))
