"""The distillation stage on a local Ray: a briefly trained tiny teacher → a student pruned from it."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from raydist.cli import main
from raydist.components.artifact import read_manifest
from raydist.components.preflight import PreflightError
from raydist.components.progress import read_history
from raydist.config import FinetuneConfig
from raydist.config.distill import DistillConfig
from raydist.config.loading import config_from_dict
from raydist.stages.distill import run_distill
from raydist.stages.finetune import run_finetune

pytestmark = pytest.mark.integration

DATA = {"train": {"builtin": "pydoc_topics", "max_tokens": 24000}, "seq_len": 64, "max_eval_sequences": 16}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Teacher correction first (as Minitron does): a full fine-tune on the same data."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = config_from_dict(FinetuneConfig, {
        "model": {"path": "tiny-random", "tiny": {"num_layers": 4}}, "data": DATA,
        "optim": {"lr": 3e-3, "schedule": "constant"}, "train": {"max_steps": 12, "micro_batch_size": 4,
                                                                  "eval_at_start": False},
        "run": {"name": "teacher", "output_dir": str(out)},
    })
    return run_finetune(cfg)


def distill_cfg(teacher, out, **kd):
    return {
        "teacher": {"path": str(teacher)},
        "student": {"source": "pruned", "prune": {"drop_layers": 1, "mlp_keep_ratio": 0.5, "kv_groups_keep": 1,
                                                  "calibration_batches": 4}},
        "data": DATA,
        "kd": {"loss": "forward_kl", "ce_weight": 0.0, **kd},
        "optim": {"lr": 3e-3, "schedule": "constant"},
        "train": {"max_steps": 8, "micro_batch_size": 4, "eval_every": 4, "checkpoint_every": 4},
        "deepspeed": {"zero_stage": 2},
        "run": {"name": "kd", "output_dir": str(out)},
    }


def test_online_kd_from_pruned_student(teacher, tmp_path):
    cfg_file = tmp_path / "distill.yaml"
    cfg_file.write_text(yaml.safe_dump(distill_cfg(teacher, tmp_path)))
    assert main(["distill", "-c", str(cfg_file)]) == 0
    art = tmp_path / "kd" / "artifact"
    m = read_manifest(art)
    # The student really is smaller: 3 of 4 layers, half the MLP, one of two KV groups.
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(art)
    t_model = AutoModelForCausalLM.from_pretrained(teacher)
    assert student.config.num_hidden_layers == 3 and student.config.intermediate_size == 64
    assert student.config.num_key_value_heads == 1 and student.config.num_attention_heads == 2
    assert m["num_parameters"] < 0.7 * sum(p.numel() for p in t_model.parameters())
    # The KD loss falls and the student moves toward the teacher.
    losses = {h["step"]: h["loss"] for h in read_history(tmp_path / "kd" / "metrics.jsonl") if "tokens_per_s" in h}
    assert losses[8] < losses[1]
    met = m["metrics"]
    assert met["teacher_ppl"] < met["pruned_before_training_ppl"]
    assert met["eval_ppl"] < met["pruned_before_training_ppl"]
    assert 0 < met["gap_recovered"] <= 1.5
    assert m["stage"] == "distill" and m["parent"]["role"] == "teacher" and m["student"]["source"] == "pruned"
    assert met["export_max_abs_logit_diff"] < 1e-3


def test_mismatched_tokenizer_is_refused(teacher, tmp_path):
    from raydist.components.models import load_model, save_model_dir
    from raydist.config import ModelConfig
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(teacher)
    vocab = tok.get_vocab()
    swapped = dict(vocab)  # same size, two ids swapped: a different vocabulary
    a, b = sorted(vocab, key=vocab.get)[10:12]
    swapped[a], swapped[b] = vocab[b], vocab[a]
    tj = json.loads((Path(teacher) / "tokenizer.json").read_text())
    tj["model"]["vocab"] = swapped
    save_model_dir(load_model(ModelConfig(path="tiny-random")), tok, other)
    (other / "tokenizer.json").write_text(json.dumps(tj))
    cfg = config_from_dict(DistillConfig, {**distill_cfg(teacher, tmp_path), "student": {"source": "pretrained", "path": str(other)}})
    with pytest.raises(PreflightError, match="tokenizers differ.*sequence-level KD"):
        run_distill(cfg)
    assert not (tmp_path / "kd").exists()
