"""Universal logit distillation across tokenizers: the loss, the alignment and the teacher's re-tokenization."""

import pytest
import torch

from raydist.core.data import IGNORE_INDEX, collate, render_prompt
from raydist.distill.cross_tokenizer import aligned_rows, retokenize, uld_loss_on_rows


def test_uld_is_zero_for_the_same_distribution_up_to_relabelling_and_pads_the_smaller_vocabulary():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 7, generator=g)
    s = t[:, torch.randperm(7, generator=g)]  # the same probabilities under other token ids
    assert float(uld_loss_on_rows(s, t)) == pytest.approx(0.0, abs=1e-6)
    # a student vocabulary of 10 with 3 entries of ~0 probability: still ~0 against the 7-entry teacher
    s10 = torch.cat([s, torch.full((5, 3), -1e4)], dim=1)
    assert float(uld_loss_on_rows(s10, t)) == pytest.approx(0.0, abs=1e-6)
    # by hand: sorted [0.75, 0.25] vs [0.5, 0.5, 0] (padded): |0.25| + |0.25| + 0 = 0.5
    s2 = torch.log(torch.tensor([[0.25, 0.75]]))
    t3 = torch.log(torch.tensor([[0.5, 0.5, 1e-30]]))
    assert float(uld_loss_on_rows(s2, t3)) == pytest.approx(0.5, abs=1e-6)


def test_uld_gradient_reaches_the_student_only_and_temperature_is_checked():
    s = torch.randn(3, 6, requires_grad=True)
    t = torch.randn(3, 9, requires_grad=True)
    loss = uld_loss_on_rows(s, t, temperature=2.0)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="temperature"):
        uld_loss_on_rows(s, t, temperature=0)
    with pytest.raises(ValueError, match="same N"):
        uld_loss_on_rows(s, t[:2])


def test_aligned_rows_pair_the_ith_targets_of_each_row_up_to_the_shorter():
    s = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)  # 3 and 2 targets
    t = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)  # 2 and 3 targets
    si, ti = aligned_rows(s, t)
    assert si.tolist() == [0, 1, 3, 4] and ti.tolist() == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_retokenize_gives_the_teacher_the_same_texts_in_its_own_tokens(tiny_tokenizer, smollm2_tokenizer):
    student, teacher = smollm2_tokenizer, tiny_tokenizer  # two really different tokenizers (49152 vs 512)
    rows = []
    for question, answer in (("Name a colour.", "Blue, like the sky."), ("Add 2 and 3.", "The sum is 5.")):
        prompt = render_prompt(student, [{"role": "user", "content": question}])
        response = student.encode(answer, add_special_tokens=False)
        rows.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
    rows.append({"input_ids": student.encode("plain text, all of it a target"), "labels": None})
    rows[-1]["labels"] = list(rows[-1]["input_ids"])
    batch = collate(rows, student.pad_token_id)
    out = retokenize(batch, student, teacher, pad_id=0)
    for i, r in enumerate(rows):
        n_prompt = sum(1 for x in r["labels"] if x == IGNORE_INDEX)
        ids = out["input_ids"][i][out["attention_mask"][i].bool()].tolist()
        labels = out["labels"][i][: len(ids)].tolist()
        t_prompt = [x for x, y in zip(ids, labels) if y == IGNORE_INDEX]
        t_resp = [y for y in labels if y != IGNORE_INDEX]
        assert teacher.decode(t_prompt) == student.decode(r["input_ids"][:n_prompt])
        assert teacher.decode(t_resp) == student.decode(r["input_ids"][n_prompt:])
        assert t_resp == ids[len(t_prompt) :] and max(ids) < len(teacher)
    assert (out["labels"][2] != IGNORE_INDEX).sum() > 0 and (out["labels"][2][:1] != IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "kd",
    [
        {"loss": "uld", "teacher_mode": "cache"},
        {"loss": "uld", "hidden": {"weight": 1.0}},
        {"loss": "uld", "on_policy": {"lmbda": 0.5}},
    ],
)
def test_uld_settings_it_does_not_run_with_are_refused(kd):
    from raydist.config import ConfigError, DistillConfig
    from raydist.config.loading import config_from_dict

    with pytest.raises(ConfigError, match="uld runs with the online teacher"):
        config_from_dict(
            DistillConfig,
            {
                "teacher": {"path": "tiny-random"},
                "data": {"train": {"path": "x.jsonl", "format": "instruction"}, "seq_len": 64},
                "kd": kd,
                "run": {"name": "d"},
            },
        )


def test_retokenize_cuts_rows_to_the_teachers_context(tiny_tokenizer, smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("a fairly long piece of text that the tiny tokenizer splits into many pieces")
    batch = collate([{"input_ids": ids, "labels": ids}], smollm2_tokenizer.pad_token_id)
    out = retokenize(batch, smollm2_tokenizer, tiny_tokenizer, pad_id=0, max_len=8)
    assert out["input_ids"].shape == (1, 8) and out["attention_mask"].sum() == 8
