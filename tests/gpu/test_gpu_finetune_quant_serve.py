"""On a CUDA GPU, end to end: raydist's fine-tune path (Ray Train + DeepSpeed, one GPU worker, bf16) trains two
steps of a tiny Llama and exports it; the artifact reloads through ``raydist.load_compressed``, is quantized to int4
weight-only with the CUDA tinygemm kernel (``aten.int4pack_mm_cuda``), written in the compressed-tensors format,
reloaded and served a greedy generation through ``BatchGenerator``.

Skipped, with the reason in pytest's summary (``-rs``), where torch sees no CUDA device. The GPU machines get the
tree without the project's environment: see ``scripts/bench/gpu.py`` for the wheels to carry, then
``python3 -m pytest -q tests/gpu``.
"""

import math
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

STEPS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two bf16 optimizer steps through ``run_finetune``; the embedded Ray it starts is stopped afterwards."""
    import ray

    from raydist.config import FinetuneConfig
    from raydist.config.loading import config_from_dict
    from raydist.train.finetune import run_finetune

    out = tmp_path_factory.mktemp("gpu-finetune")
    cfg = config_from_dict(
        FinetuneConfig,
        {
            "model": {"path": "tiny-random"},  # hidden 64, MLP 128: int4 groups of 64 fit every layer
            "data": {"train": {"builtin": "pydoc_topics", "max_tokens": 8000}, "seq_len": 64, "max_eval_sequences": 4},
            "optim": {"lr": 1e-3, "schedule": "constant"},
            "train": {"max_steps": STEPS, "micro_batch_size": 2},
            "deepspeed": {"zero_stage": 2},
            "scaling": {"num_workers": 1},
            "resources": {"num_cpus": 1, "num_gpus": 1},
            "run": {"name": "gpu-tiny", "output_dir": str(out), "max_failures": 0},
        },
    )
    try:
        artifact = Path(run_finetune(cfg, verbose=False))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return artifact, out / "gpu-tiny"


def test_two_bf16_steps_on_the_gpu_export_an_artifact_that_reloads(trained):
    from safetensors import safe_open

    import raydist
    from raydist.core.progress import read_history

    artifact, run_dir = trained
    history = read_history(run_dir / "metrics.jsonl")
    steps = [h for h in history if "tokens_per_s" in h]
    assert [h["step"] for h in steps] == list(range(1, STEPS + 1))
    assert all(math.isfinite(h["loss"]) for h in steps)
    workers = next(h for h in history if h.get("event") == "workers")["workers"]
    assert [w["device"].split(":")[0] for w in workers] == ["cuda"]
    with safe_open(str(artifact / "model.safetensors"), "pt") as st:  # the bf16 engine's weights, as trained
        assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.bfloat16}
    model = raydist.load_compressed(artifact, device="cuda", dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    ids = torch.randint(4, model.config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_int4_on_cuda_uses_the_tinygemm_kernel_reloads_and_serves(trained, tmp_path):
    from transformers import AutoTokenizer

    import raydist
    from raydist.compress.quant.format import save_compressed
    from raydist.compress.quant.quantize import quantize_model, quantized_layers
    from raydist.serve.engine import BatchGenerator, GenerationRequest, SamplingParams

    artifact, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    model = raydist.load_compressed(artifact, device="cuda", dtype=torch.bfloat16)
    report = quantize_model(model, "int4_weight_only", group_size=64, device="cuda")
    assert report["kernel"] == "aten.int4pack_mm_cuda" and report["skipped_layers"] == 0
    ids = torch.randint(4, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()

    save_compressed(model, tokenizer, tmp_path / "int4", report)
    reloaded = raydist.load_compressed(tmp_path / "int4", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits.float()
    layers = quantized_layers(reloaded)
    assert layers and {m.kernel for m in layers.values()} == {"aten.int4pack_mm_cuda"}
    torch.testing.assert_close(after, before, atol=1e-2, rtol=0)

    new = 8
    engine = BatchGenerator(reloaded, tokenizer)
    done = engine.generate([GenerationRequest(ids[0].tolist(), SamplingParams(new, temperature=0.0, ignore_eos=True))])
    assert done[0].completion_tokens == new and len(done[0].token_ids) == new
    assert done[0].token_ids[0] == int(after[0, -1].argmax())  # greedy: the served first token is the argmax
