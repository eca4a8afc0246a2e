"""Acceptance: the real pretrained SmolLM2-135M-Instruct (from the PyPI package's GGUF), LoRA on Ray Train."""

import pytest

from raydist.config import FinetuneConfig
from raydist.config.loading import config_from_dict
from raydist.core.artifact import read_manifest
from raydist.train.finetune import run_finetune

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


def test_smollm2_blocks_sit_on_the_q4_1_grid(smollm2_dir):
    """What the README says about the weights: the GGUF's Q4_1 decoder blocks, dequantized, sit on a 16-level grid
    per group of 32 input channels (min + k * step, k integer) to float rounding; raydist's int4 at group size 32 has
    the same step and lands within half a step (its zero point is an integer, Q4_1's minimum is not); the Q8_0
    embedding is not a 4-bit grid."""
    import torch

    from raydist.compress.quant.codes import int4_minmax_qparams, int4_on_grid
    from raydist.config import ModelConfig
    from raydist.core.models import load_model

    model = load_model(ModelConfig(path=str(smollm2_dir)))
    blocks = [
        m.weight.detach().float()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    ]
    assert len(blocks) == 30 * 7
    for w in blocks:
        g = w.reshape(w.shape[0], -1, 32)
        lo, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
        k = (g - lo) / step.clamp(min=1e-12)
        assert ((k - k.round()).abs() <= 1e-3).all()  # on the grid: float rounding, not rounding (0.5)
        scale, zero = int4_minmax_qparams(w, 32)
        assert ((int4_on_grid(w, scale, zero) - w).abs() <= 0.5 * scale.repeat_interleave(32, dim=1) + 1e-7).all()
    emb = model.get_input_embeddings().weight.detach().float()
    scale, zero = int4_minmax_qparams(emb, 32)
    err = (int4_on_grid(emb, scale, zero) - emb).abs().amax(dim=1)
    assert (err > 0.1 * scale.amax(dim=1)).float().mean() > 0.5  # 8-bit values: int4 rounds them off
