"""``scripts/bench/gpu.py --cpu`` end to end: every part of the GPU benchmark (raydist's fine-tune loop against the
hand-written DeepSpeed loop, the distillation host share, quantized generation) on tiny shapes, in a subprocess
with a Ray of its own, writing its results to a temporary ``--out`` only.

In tests/integration because it starts Ray Train twice and DeepSpeed three times: several minutes on a busy
2-core box (252-256 s measured while other jobs loaded it; ~100 s of CPU time), far over a unit test's
budget.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_gpu_bench_cpu_mode_measures_every_part(tmp_path):
    results = REPO / "benchmarks" / "results" / "gpu.json"
    had_results = results.exists()
    ray_tmp = tempfile.mkdtemp(prefix="r-gb-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "DS_ACCELERATOR": "cpu"}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "bench" / "gpu.py"), "--cpu", "--out", str(tmp_path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert results.exists() == had_results  # CPU mode with --out leaves benchmarks/results alone

    assert r["mode"] == "cpu" and r["device"] == "cpu" and r["provenance"]["command"]
    assert positive(r["matmul"][0]["flops_per_s"])

    ft = r["finetune"]
    assert "error" not in ft
    for side in ("raydist", "hand_written"):
        s = ft[side]
        assert positive(s["tokens_per_s"]) and positive(s["median_step_s"]) and s["steps_timed"] >= 2
        assert positive(s["mfu"])
    assert positive(ft["raydist"]["peak_memory_bytes"])
    assert positive(ft["overhead_ratio"])
    assert ft["model"]["flops_per_token"] > 6 * ft["model"]["matmul_parameters"]

    di = r["distill"]
    assert "error" not in di
    assert positive(di["step_s"]) and positive(di["arithmetic_step_s"])
    assert 0 <= di["host_share"] <= 1 and di["host_share"] + di["arithmetic_share"] == pytest.approx(1)

    gen = r["generation"]
    assert set(gen["rows"]) == {"dense", "int8", "int4"}
    for name, row in gen["rows"].items():
        assert "error" not in row, (name, row)
        assert (
            positive(row["tokens_per_s_b1"]) and positive(row["tokens_per_s_b16"]) and positive(row["artifact_bytes"])
        )
    assert (
        gen["rows"]["int4"]["artifact_bytes"]
        < gen["rows"]["int8"]["artifact_bytes"]
        < gen["rows"]["dense"]["artifact_bytes"]
    )
    assert gen["vllm"].get("skipped") == "vllm not installed" or positive(gen["vllm"].get("tokens_per_s_b1"))
