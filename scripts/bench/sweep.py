"""Sweep benchmark: a 16-configuration compression sweep of SmolLM2-135M-Instruct by `raydist sweep`
(Ray Tune: base model loaded once into the object store, 2 trials at a time, ASHA on growing eval budgets)
against a naive loop that, for each configuration, reloads the model from disk, compresses it the same way
(``raydist.compress.candidate.apply_candidate``), saves it and measures it in full.

    .venv/bin/python scripts/bench/sweep.py [--out DIR] [--no-write]

    sweep_wall_ratio = raydist sweep wall time / naive loop wall time        (goal <= 0.5)

Both sides measure the same things per candidate (bytes on disk, generation tokens/s at batch 1 and 8 with
32 new tokens after a 32-token prompt, perplexity on the protocol's eval text: the first 4,096 SmolLM2
tokens of pydoc topics in 512-token windows; calibration 16 x 128 tokens from token 50,000); the sweep may
stop a candidate early (ASHA at 1,024 / 2,048 / 4,096 tokens; a stopped candidate's speed is not measured),
the loop never does. Run it on an otherwise idle machine: both sides are timed, one after the other. The search space
(16 distinct candidates): method {none, magnitude, wanda, sparsegpt} at 50 % x structured {0, 25 % of the
block parameters (MLP)} x quantization {none, int8_dynamic}.

Results: ``benchmarks/results/sweep.json`` and the "Compression sweep" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "smollm2-135m"
COMMAND = ".venv/bin/python scripts/bench/sweep.py"
SPACE = {
    "method": ["none", "magnitude", "wanda", "sparsegpt"],
    "sparsity": [0.5],
    "structured": [0.0, 0.25],
    "structure": ["mlp"],
    "quantization": ["none", "int8_dynamic"],
}


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def sweep_config(out: Path, name: str) -> dict:
    return {
        "stage": "sweep",
        "model": {"path": str(MODEL)},
        "search_space": SPACE,
        "search": {"algorithm": "grid", "max_concurrent": 2},
        "resources": {"num_cpus": 1},
        "policy": {"max_quality_loss_pct": 5.0, "prefer": "smallest"},
        "keep_artifacts": "winner",
        "run": {"name": name, "output_dir": str(out)},
    }


def naive_loop(cfg, out: Path) -> dict:
    """What a user without raydist writes: for each configuration, load, compress, save, measure."""
    import torch

    from raydist.compress.candidate import apply_candidate, token_rows
    from raydist.core.evaluation import perplexity_on
    from raydist.core.models import load_model, load_tokenizer
    from raydist.compress.quant.quantization import save_compressed
    from raydist.core.data import text_source_ids
    from raydist.sweep.sweep import measure

    torch.set_num_threads(2)
    rows, t0 = [], time.time()
    for i, cand in enumerate(cfg.search_space.candidates()):
        t = time.time()
        tok = load_tokenizer(cfg.model)
        model = load_model(cfg.model).eval()
        windows = token_rows(text_source_ids(cfg.eval.data, tok)[: cfg.eval.budgets[-1]], cfg.eval.window)
        calib = token_rows(
            text_source_ids(cfg.eval.calibration, tok), cfg.eval.calibration_seq_len, cfg.eval.calibration_sequences
        )
        apply_candidate(model, cand, calibration=calib)
        art = out / f"naive-{i}"
        save_compressed(model, tok, art, None)
        m = measure(model, tok, cfg.eval, art)
        m["ppl"] = perplexity_on(model, windows)
        shutil.rmtree(art)
        rows.append(
            {
                "candidate": cand,
                "ppl": m["ppl"],
                "disk_bytes": m["disk_bytes"],
                "tokens_per_s": m["tokens_per_s"],
                "seconds": time.time() - t,
            }
        )
        say(f"naive {i + 1}/16 {json.dumps(cand, sort_keys=True)}: ppl {m['ppl']:.3f} in {time.time() - t:.0f}s")
    return {"wall_s": time.time() - t0, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--skip-naive", action="store_true", help="sweep only (no ratio)")
    args = ap.parse_args()
    os.chdir(ROOT)
    from raydist.config.loading import config_from_dict
    from raydist.config.sweep import SweepConfig
    from raydist.sweep.sweep import NoCandidateMet, run_sweep

    out = (args.out or Path(tempfile.mkdtemp(prefix="raydist-bench-sweep-"))).resolve()
    name = f"sweep-{int(time.time())}"
    cfg = config_from_dict(SweepConfig, sweep_config(out, name))
    assert len(cfg.search_space.candidates()) == 16
    say(f"raydist sweep of 16 candidates -> {out / name}")
    t0 = time.time()
    try:
        run_sweep(cfg)
    except NoCandidateMet as e:
        say(str(e))
    sweep_wall = time.time() - t0
    import ray

    ray.shutdown()
    report = json.loads((out / name / "sweep_report.json").read_text())
    naive = None if args.skip_naive else naive_loop(cfg, out)
    import torch

    result = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        "command": COMMAND,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "search_space": SPACE,
        "sweep_wall_s": sweep_wall,
        "naive_wall_s": naive and naive["wall_s"],
        "sweep_wall_ratio": sweep_wall / naive["wall_s"] if naive else None,
        "counts": report["counts"],
        "base": {k: report["base"][k] for k in ("ppl", "disk_bytes", "tokens_per_s")},
        "winner": report["winner"],
        "winner_reason": report["winner_reason"],
        "pareto_front": [
            {k: t.get(k) for k in ("candidate", "ppl", "disk_bytes", "tokens_per_s")}
            for t in report["trials"]
            if t.get("pareto")
        ],
        "trials": [
            {
                k: t.get(k)
                for k in (
                    "candidate",
                    "status",
                    "ppl",
                    "eval_tokens",
                    "disk_bytes",
                    "tokens_per_s",
                    "tokens_per_s_b8",
                    "quality_loss_pct",
                    "speedup",
                    "size_ratio",
                )
            }
            for t in report["trials"]
        ],
        "naive": naive and naive["rows"],
    }
    print(json.dumps({k: result[k] for k in ("sweep_wall_s", "naive_wall_s", "sweep_wall_ratio", "counts")}, indent=1))
    if not args.no_write:
        path = ROOT / "benchmarks" / "results" / "sweep.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        say(f"wrote {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
