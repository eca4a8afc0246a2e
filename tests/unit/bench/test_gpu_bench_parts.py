"""The pure parts of ``scripts/bench/gpu.py`` (its CPU-mode run end to end is
``tests/integration/test_gpu_bench_cpu_mode.py``): the FLOP count behind its MFU, and its BENCHMARKS.md section."""

import pytest


@pytest.fixture(scope="module")
def gpu_bench(load_bench):
    return load_bench("gpu")


def test_flops_per_token_of_the_smollm2_360m_shape(gpu_bench, tmp_path):
    shape = gpu_bench.make_shape_dir(tmp_path / "shape", gpu_bench.SMOLLM2_360M)
    f = gpu_bench.flops_per_token(shape, 2048)
    per_layer = 2 * 960 * 960 + 2 * 960 * 320 + 3 * 960 * 2560  # q, o; k, v (5 KV heads of 64); gate, up, down
    head = 49152 * 960  # the tied LM head is a matmul; the embedding lookup is not
    assert f["matmul_parameters"] == 32 * per_layer + head
    assert f["parameters"] == 32 * per_layer + head + 2 * 32 * 960 + 960  # + RMSNorm weights: SmolLM2-360M's 361.8 M
    assert f["flops_per_token"] == 6 * f["matmul_parameters"] + 12 * 32 * 960 * 2048


def test_markdown_section_from_a_results_file(gpu_bench):
    ft_side = {"tokens_per_s": 1e5, "mfu": 0.47, "peak_memory_bytes": 30 * 2**30, "median_step_s": 0.16}
    r = {
        "device": "NVIDIA H100 80GB HBM3",
        "provenance": {"git_commit": "a" * 40, "git_dirty": False, "command": "python3 scripts/bench/gpu.py"},
        "matmul": [{"n": 8192, "dtype": "bfloat16", "flops_per_s": 7e14}],
        "wall_s": 300.0,
        "finetune": {
            "model": {"shape": {"num_hidden_layers": 32}, "parameters": 361821120, "flops_per_token": 2.9e9,
                      "formula": "6 N + 12 L h s"},
            "micro_batch": 8, "seq_len": 2048, "steps": 30, "warmup_steps_dropped": 3, "matmul_flops_per_s": 7e14,
            "raydist": ft_side, "hand_written": {**ft_side, "median_step_s": 0.155}, "overhead_ratio": 1.032,
            "goal_mfu_met": True, "goal_overhead_met": True,
        },
        "distill": {"error": "RuntimeError: boom"},
        "generation": {
            "settings": {"gen_prompt": 64, "gen_new_tokens": 64, "gen_repeats": 3, "gen_batches": [1, 16]},
            "rows": {
                "dense": {"artifact_bytes": 2**29, "kernels": ["dense"], "tokens_per_s_b1": 90.0,
                          "tokens_per_s_b16": 1400.0, "vs_dense_b1": 1.0, "vs_dense_b16": 1.0},
                "int4": {"error": "ImportError: no torchao"},
            },
            "vllm": {"skipped": "vllm not installed"},
        },
    }  # fmt: skip
    md = gpu_bench.markdown(r)
    assert md.startswith(f"{gpu_bench.SECTION_PREFIX} ") and "(NVIDIA H100 80GB HBM3)" in md.splitlines()[0]
    assert "47.0 %" in md and "ratio 1.032" in md and "30.0 GiB" in md
    assert "RuntimeError: boom" in md and "ImportError: no torchao" in md and "vllm not installed" in md
