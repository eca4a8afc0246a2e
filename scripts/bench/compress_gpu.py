"""Generation speed of compressed SmolLM2-shaped models on one GPU, bf16 dense baseline in the same run.

    python scripts/bench/compress_gpu.py --shape DIR [--results PATH]

``--shape`` holds SmolLM2-135M's config.json and tokenizer files only: the GPU machines cannot reach the
hub and the real weights do not fit what travels there, so the weights are random. Speed depends on
shapes and kernels, not on weight values (generation is forced to exactly ``--new-tokens`` tokens); no
perplexity is reported. Each row builds the model fresh, compresses it with raydist's own code (the
same code the sweep's trials run) and measures greedy generation with the KV cache at batch 1 and 8.

Rows: dense bf16; int8 weight-only, int8 dynamic, int4 weight-only (group 64) through
``quantize.quantize_model`` with the device's kernels; structured25 (25 % of the block parameters
removed as MLP channels, ``candidate.structured_plan``); 2:4 Wanda (sparse values in dense kernels, so
the same speed as dense is expected and reported honestly).

Results: ``--results`` (default ``benchmarks/results/compress_gpu.json``) with the run's ``provenance`` (commit,
command, machine, versions). The GPU machines get a copy of the tree without ``.git``: set
``BENCH_GIT_COMMIT`` (and ``BENCH_GIT_DIRTY``) there so the results record the commit (``_common.provenance``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS_DIR, provenance  # noqa: E402  (scripts/bench is not a package)

ROOT = REPO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=Path, required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", type=Path, default=RESULTS_DIR / "compress_gpu.json")
    args = ap.parse_args()
    measured = provenance()  # before the run: the code that is measured is the code at the start
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raydist.compress.candidate import apply_candidate
    from raydist.core.evaluation import model_size
    from raydist.sweep.speed import generation_speed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = AutoConfig.from_pretrained(args.shape)

    def fresh():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(config)
        return m.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()

    rows = {
        "dense_bf16": None,
        "int8_weight_only": {"quantization": "int8_weight_only"},
        "int8_dynamic": {"quantization": "int8_dynamic"},
        "int4_g64": {"quantization": "int4_weight_only", "group_size": 64},
        "structured25": {"structured": 0.25, "structure": "mlp"},
        "wanda_2of4": {"method": "wanda", "pattern": "2:4", "sparsity": 0.5},
    }
    base = {
        "method": "none",
        "sparsity": 0.0,
        "pattern": None,
        "structured": 0.0,
        "structure": "mlp",
        "quantization": "none",
        "group_size": None,
        "recovery": "none",
    }
    calib = torch.randint(0, config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(1)).to(device)
    result = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "command": measured["command"],
        "provenance": measured,  # commit, command, machine, versions
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "weights": "SmolLM2-135M-shaped, random (speed only)",
        "settings": {"prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "repeats": args.repeats},
        "rows": {},
    }
    for name, cand in rows.items():
        try:
            model = fresh()
            report = {}
            if cand:
                report = apply_candidate(model, {**base, **cand}, calibration=calib, device=device)
            r = {"size": model_size(model)}
            if "quantization" in report:
                r["kernel"] = report["quantization"].get("kernel")
            for b in (1, 8):
                sp = generation_speed(
                    model,
                    batch_size=b,
                    prompt_len=args.prompt,
                    new_tokens=args.new_tokens,
                    repeats=args.repeats,
                    warmup=2,
                )
                r[f"tokens_per_s_b{b}"] = sp["tokens_per_s"]
            result["rows"][name] = r
            print(name, json.dumps(r), flush=True)
            del model
            torch.cuda.empty_cache() if device == "cuda" else None
        except Exception as e:  # noqa: BLE001 - a row that fails is reported, the others still run
            traceback.print_exc()
            result["rows"][name] = {"error": f"{type(e).__name__}: {e}"}
    dense = result["rows"].get("dense_bf16", {})
    for name, r in result["rows"].items():
        for b in (1, 8):
            if f"tokens_per_s_b{b}" in r and f"tokens_per_s_b{b}" in dense:
                r[f"speedup_b{b}"] = r[f"tokens_per_s_b{b}"] / dense[f"tokens_per_s_b{b}"]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                n: {k: v for k, v in r.items() if k.startswith(("speedup", "tokens", "error", "kernel"))}
                for n, r in result["rows"].items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
