import math

import pytest
import torch

from raydist.config import DeepSpeedSettings, OptimConfig
from raydist.core.progress import read_history
from raydist.train.plumbing import adamw, deepspeed_config, lr_lambda, param_groups


def test_warmup_then_cosine_to_floor():
    f = lr_lambda(OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), total_steps=20)
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.1)
    assert f(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_warmup_fraction_and_linear():
    f = lr_lambda(OptimConfig(warmup_fraction=0.5, schedule="linear"), total_steps=10)
    assert f(4) < 1.0 and f(5) == pytest.approx(1.0) and f(10) == pytest.approx(0.0)


def test_deepspeed_config_from_settings():
    ds = deepspeed_config(
        DeepSpeedSettings(
            zero_stage=3,
            offload_optimizer=True,
            offload_params=True,
            extra={"zero_optimization": {"reduce_bucket_size": 7}},
        ),
        micro_batch_size=2,
        grad_accum_steps=4,
        grad_clip=0.5,
        bf16=False,
    )
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    assert z["reduce_bucket_size"] == 7 and z["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False


def test_no_weight_decay_on_norms_and_biases():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = param_groups(m, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0.0


def test_history_keeps_the_redone_steps(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(
        '{"time": 1, "step": 1, "loss": 3.0, "tokens_per_s": 1}\n'
        '{"time": 2, "step": 2, "loss": 2.9, "tokens_per_s": 1}\n'
        '{"time": 3, "event": "resumed", "step": 1}\n{"time": 4, "step": 2, "loss": 2.8, "tokens_per_s": 1}\n'
    )
    h = read_history(p)
    assert [r.get("loss") for r in h if "loss" in r] == [3.0, 2.8]


def _two_params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(64, 48, generator=g)), torch.nn.Parameter(torch.randn(48, generator=g))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def test_adamw_is_fused_on_cpu_and_steps_like_the_loop():
    optim = OptimConfig(lr=1e-2, weight_decay=0.1)
    start, fused_params, loop_params = _two_params(0), _two_params(0), _two_params(0)
    fused = adamw(param_groups(torch.nn.ParameterList(fused_params), optim.weight_decay), optim)
    unfused = optim.model_copy(update={"fused": False})
    loop = adamw(param_groups(torch.nn.ParameterList(loop_params), optim.weight_decay), unfused)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    for _ in range(3):
        fused.step()
        loop.step()
    for a, b, s in zip(fused_params, loop_params, start):
        assert (a - s).abs().min() > 1e-3  # every entry moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The same state layout either way: a checkpoint written by one optimizer loads into the other.
    loop.load_state_dict(fused.state_dict())
    loop.step()
