"""Acceptance: the real pretrained SmolLM2-135M-Instruct (from the PyPI package's GGUF), LoRA on Ray Train."""

import pytest

from raydist.components.artifact import read_manifest
from raydist.config import FinetuneConfig
from raydist.config.loading import config_from_dict
from raydist.stages.finetune import run_finetune

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_smollm2_lora_finetune_lowers_perplexity(smollm2_dir, tmp_path):
    cfg = config_from_dict(
        FinetuneConfig,
        {
            "model": {"path": str(smollm2_dir)},
            "data": {
                "train": {"builtin": "pydoc_topics", "skip_tokens": 8192, "max_tokens": 4096},
                "eval": {"builtin": "pydoc_topics", "max_tokens": 1024},
                "seq_len": 128,
                "eval_seq_len": 512,
            },
            "lora": {"enabled": True, "r": 16, "alpha": 32},
            "optim": {"lr": 5e-4, "schedule": "constant"},
            "train": {"max_steps": 4, "micro_batch_size": 2},
            "deepspeed": {"zero_stage": 2},
            "run": {"name": "smollm2", "output_dir": str(tmp_path)},
        },
    )
    art = run_finetune(cfg)
    m = read_manifest(art)
    before, after = m["metrics"]["eval_ppl_before"], m["metrics"]["eval_ppl"]
    assert 5 < before < 30  # a real pretrained model on English text (a random one scores ~50,000)
    assert after < before
    assert m["num_parameters"] == 134_515_008 and m["parent"]["kind"] == "hf_dir"
    assert m["metrics"]["export_max_abs_logit_diff"] < 1e-3
    assert m["lora"]["adapter_nonzero"] is True
