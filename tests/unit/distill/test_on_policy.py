"""On-policy distillation's pieces: which micro-batches, the prompts, the student's completions, the config."""

import pytest
import torch

from raydist.config import ConfigError, DistillConfig, ModelConfig
from raydist.config.loading import config_from_dict
from raydist.core.data import IGNORE_INDEX, collate
from raydist.core.models import load_model
from raydist.distill.on_policy import is_on_policy, on_policy_batch, prompt_lengths


def test_on_policy_coin_is_deterministic_and_has_the_asked_weight():
    assert not any(is_on_policy(0, m, 0.0) for m in range(100))
    assert all(is_on_policy(0, m, 1.0) for m in range(100))
    picks = [is_on_policy(3, m, 0.5) for m in range(2000)]
    assert picks == [is_on_policy(3, m, 0.5) for m in range(2000)]  # a resumed run makes the same choices
    assert 0.45 < sum(picks) / len(picks) < 0.55
    assert picks != [is_on_policy(4, m, 0.5) for m in range(2000)]


def test_prompt_lengths():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100], [1, 2, 3, 4], [-100, -100, -100, -100]])
    assert prompt_lengths(labels) == [2, 1, 0, 4]


@pytest.fixture(scope="module")
def student():
    model = load_model(ModelConfig(path="tiny-random"), seed=0)
    # an untied random head, so that greedy completions are not one repeated token
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
    )
    return model.train()


def rows_batch(rows, pad_id=0):
    return collate([{"input_ids": ids, "labels": labels} for ids, labels in rows], pad_id)


def test_completions_replace_the_responses_and_keep_the_prompts(student):
    batch = rows_batch(
        [
            ([5, 6, 7, 8, 9, 10], [IGNORE_INDEX] * 3 + [8, 9, 10]),
            ([11, 12, 13, 14], [IGNORE_INDEX] * 2 + [13, 14]),
        ]
    )
    rng_before = torch.random.get_rng_state()
    out = on_policy_batch(student, batch, max_new_tokens=5, temperature=0.0, pad_id=0, eos_id=None, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # dropout's RNG is not disturbed
    assert student.training  # back in training mode
    assert out["input_ids"].shape == (2, 8)
    for i, prompt in enumerate(([5, 6, 7], [11, 12])):
        n = len(prompt)
        ids, labels = out["input_ids"][i].tolist(), out["labels"][i].tolist()
        assert ids[:n] == prompt and labels[:n] == [IGNORE_INDEX] * n
        assert labels[n : n + 5] == ids[n : n + 5]  # the student's 5 tokens are the targets
        with torch.no_grad():  # greedy: what the student itself generates for the prompt alone
            ref = student.eval().generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, n, dtype=torch.long),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
            )
        student.train()
        assert ids[n : n + 5] == ref[0, n:].tolist()
    assert out["attention_mask"].sum(1).tolist() == [8, 7]


def test_sampling_is_seeded_and_stops_at_eos(student):
    batch = rows_batch([([5, 6, 7, 8], [IGNORE_INDEX] * 2 + [7, 8])] * 3)
    a = on_policy_batch(student, batch, max_new_tokens=12, temperature=1.0, pad_id=0, eos_id=None, seed=7)
    b = on_policy_batch(student, batch, max_new_tokens=12, temperature=1.0, pad_id=0, eos_id=None, seed=7)
    c = on_policy_batch(student, batch, max_new_tokens=12, temperature=1.0, pad_id=0, eos_id=None, seed=8)
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    greedy = on_policy_batch(student, batch, max_new_tokens=12, temperature=0.0, pad_id=0, eos_id=None, seed=0)
    first, eos = greedy["input_ids"][0, 2:4].tolist()  # make the second greedy token the end of sequence
    assert first != eos
    d = on_policy_batch(student, batch, max_new_tokens=12, temperature=0.0, pad_id=0, eos_id=eos, seed=0)
    row = d["input_ids"][0][d["attention_mask"][0].bool()].tolist()
    assert row == [5, 6, first, eos] and d["labels"][0].tolist()[:4] == [IGNORE_INDEX, IGNORE_INDEX, first, eos]


def test_rows_without_a_prompt_are_refused(student):
    batch = rows_batch([([5, 6, 7], [5, 6, 7])])
    with pytest.raises(ValueError, match="needs prompts"):
        on_policy_batch(student, batch, max_new_tokens=2, temperature=0.0, pad_id=0, eos_id=None, seed=0)


def base(**over):
    data = {
        "teacher": {"path": "tiny-random"},
        "data": {"train": {"path": "x.jsonl", "format": "instruction"}, "seq_len": 64},
        "kd": {"on_policy": {"lmbda": 1.0}},
        "run": {"name": "d"},
    }
    data.update(over)
    return config_from_dict(DistillConfig, data)


def test_on_policy_config_defaults_and_refusals():
    op = base().kd.on_policy
    assert (op.lmbda, op.loss, op.max_new_tokens, op.temperature) == (1.0, "reverse_kl", 64, 1.0)
    with pytest.raises(ConfigError, match="needs the online teacher"):
        base(kd={"teacher_mode": "cache", "on_policy": {"lmbda": 0.5}})
    with pytest.raises(ConfigError, match="needs prompts to complete"):
        base(data={"train": {"builtin": "pydoc_topics"}, "seq_len": 64})
    with pytest.raises(ConfigError, match="needs prompts to complete"):
        base(data={"train": {"path": "x.jsonl", "format": "instruction"}, "seq_len": 64, "packing": True})
    with pytest.raises(ConfigError, match="lmbda"):
        base(kd={"on_policy": {"lmbda": 1.5}})
    assert op.start_step == 0
    with pytest.raises(ConfigError, match=r"start_step \(30\) must be below train.max_steps \(30\)"):
        base(kd={"on_policy": {"lmbda": 1.0, "start_step": 30}}, train={"max_steps": 30})
    assert (
        base(kd={"on_policy": {"lmbda": 1.0, "start_step": 29}}, train={"max_steps": 30}).kd.on_policy.start_step == 29
    )
