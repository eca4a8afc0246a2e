"""Distillation throughput on one GPU: online bf16 teacher vs. the offline top-k cache (issue 3's GPU check).

    python scripts/bench/distill_gpu.py --shape DIR [--steps 30 --micro 8 --seq-len 512] [--out DIR]

The GPU machines lent to this project cannot reach the model hub and the real SmolLM2 weights (538 MB)
do not fit what travels there, so the teacher is **SmolLM2-135M-shaped with random weights** (``--shape``
is a directory holding SmolLM2's ``config.json`` and tokenizer files only). Throughput depends on shapes,
not on weight values; the perplexities of this run mean nothing and are not reported.

Both runs go through ``raydist.distill.distill.run_distill`` exactly as the CLI does: 1 Ray Train GPU
worker, DeepSpeed ZeRO-2, bf16 (teacher in bf16 inference mode), the student pruned from the teacher like
scripts/bench/distill.py's (10 layers dropped, half the MLP channels: 54 % of the parameters), plain text
(pydoc topics, every position a target), forward KL. Step time = gap between consecutive step records in
metrics.jsonl, median over the steps after ``DROP_STEPS``.

    cache_speedup = online median step time / cache median step time

Writes ``--results`` (JSON, default benchmarks/results/distill_gpu.json). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DROP_STEPS = 3


def build_teacher(shape: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "config.json").is_file():
        return out
    config = AutoConfig.from_pretrained(shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in shape.iterdir():
        if f.name != "config.json" and f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return out


def step_stats(run_dir: Path) -> dict:
    from raydist.core.progress import read_history

    recs = [h for h in read_history(run_dir / "metrics.jsonl") if "tokens_per_s" in h]
    times = {int(h["step"]): float(h["time"]) for h in recs}
    gaps = [times[s] - times[s - 1] for s in sorted(times) if s - 1 in times and s > DROP_STEPS]
    return {
        "median_step_s": statistics.median(gaps) if gaps else None,
        "steps_timed": len(gaps),
        "gaps_s": [round(g, 4) for g in gaps],
    }


def run(mode: str, teacher: Path, args, runs: Path) -> dict:
    from raydist.core.artifact import read_manifest
    from raydist.config.distill import DistillConfig
    from raydist.config.loading import config_from_dict
    from raydist.distill.distill import run_distill

    cfg = {
        "stage": "distill",
        "teacher": {"path": str(teacher)},
        "student": {"source": "pruned", "prune": {"drop_layers": 10, "mlp_keep_ratio": 0.5, "calibration_batches": 8}},
        "data": {
            "train": {"builtin": "pydoc_topics", "skip_tokens": 8192},
            "eval": {"builtin": "pydoc_topics", "max_tokens": 4096},
            "seq_len": args.seq_len,
        },
        "kd": {
            "loss": "forward_kl",
            "temperature": 1.0,
            "ce_weight": 0.0,
            "teacher_mode": mode,
            "top_k": args.top_k,
            "cache_actors": 1,
            "cache_batch_size": 32,
        },
        "optim": {"lr": 1e-4, "warmup_steps": 2},
        "train": {"max_steps": args.steps, "micro_batch_size": args.micro, "keep_checkpoints": 1},
        "deepspeed": {"zero_stage": 2},
        "scaling": {"num_workers": 1},
        "resources": {"num_cpus": 2, "num_gpus": 1 if args.use_gpu else 0},
        "run": {"name": f"gpu-{mode}", "output_dir": str(runs)},
    }
    t0 = time.time()
    art = run_distill(config_from_dict(DistillConfig, cfg))
    wall = time.time() - t0
    m = read_manifest(art)
    stats = step_stats(Path(art).parent)
    tokens_per_step = args.micro * args.seq_len
    return {
        "mode": mode,
        "wall_s": wall,
        **stats,
        "tokens_per_s": tokens_per_step / stats["median_step_s"] if stats["median_step_s"] else None,
        "manifest_tokens_per_s": m["metrics"].get("tokens_per_s"),
        "num_parameters": m.get("num_parameters"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=Path, required=True, help="dir with SmolLM2's config.json + tokenizer files")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cpu", dest="use_gpu", action="store_false", help="smoke-test the script on CPU")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "distill_gpu.json")
    args = ap.parse_args()
    import torch

    out = (args.out or Path(tempfile.mkdtemp(prefix="raydist-gpu-"))).resolve()
    teacher = build_teacher(args.shape.resolve(), out / "teacher")
    result: dict = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python scripts/bench/distill_gpu.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "versions": {"torch": torch.__version__},
        "weights": "SmolLM2-135M-shaped, random (throughput only)",
        "settings": {
            "steps": args.steps,
            "micro_batch": args.micro,
            "seq_len": args.seq_len,
            "top_k": args.top_k,
            "workers": 1,
            "zero_stage": 2,
            "dtype": "bf16",
        },
    }
    for mode in ("online", "cache"):
        try:
            result[mode] = run(mode, teacher, args, out / "runs")
        except Exception as e:  # noqa: BLE001 - report and go on with the other mode
            import traceback

            traceback.print_exc()
            result[mode] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(result[mode], indent=1), flush=True)
    on, ca = result["online"].get("median_step_s"), result["cache"].get("median_step_s")
    if on and ca:
        result["cache_speedup"] = on / ca
        result["online_tokens_per_s"] = result["online"]["tokens_per_s"]
        result["cache_tokens_per_s"] = result["cache"]["tokens_per_s"]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("online", "cache")}, indent=1))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
