"""Serving benchmark: `raydist serve` (Ray Serve + the OpenAI API) on SmolLM2-135M under load.

Run from anywhere (it changes to the repository root)::

    RAY_TMPDIR=/tmp/r-serve .venv/bin/python scripts/bench/serve_load.py          # ~3-6 min on 2 cores
    .venv/bin/python scripts/bench/serve_load.py --threads 1    # a box shared with other jobs: 2 torch
                                                                # threads then stall on each other

What it measures
    One replica (``resources.num_cpus`` = ``--threads`` torch threads, fp32 on CPU, bf16 on GPU) serves
    ``models/smollm2-135m`` on a private local Ray. A client in this process sends ``--requests`` greedy
    ``/v1/completions`` requests (``max_tokens`` = ``--max-tokens``, prompts = distinct slices of the stdlib's
    pydoc corpus, ~24-40 tokens; ``--c1-requests`` of them at concurrency 1) over HTTP with 1, 4 and 16 in
    flight, and records per-request latency
    (send to last byte), requests/s and generated tokens/s (``usage.completion_tokens`` summed / wall time).
    The same runs again with batching off (the replica decodes one request at a time).

    - ``batching_speedup_c16`` = generated tokens/s at concurrency 16, batching on / off (goal >= 3).
    - ``overhead_ms_c1`` = median over prompts of (HTTP latency at concurrency 1 - the same request decoded
      in this process by the same engine, ``BatchGenerator.generate``, same threads, run right after it so
      both see the same background load): what Ray Serve, the proxy, the batch queue and the API layer add
      to a request (goal <= 15 ms). The in-process ``transformers`` ``model.generate`` time of the same
      requests (same token count) is reported beside it. On a box shared with other jobs the two decodes
      see different load, so ``serving_overhead_ms_c1`` = HTTP latency - the decode time the replica itself
      measured for that request (``/stats`` ``decode_busy_s`` before/after) is reported too.
    - ``--winner DIR`` adds the same load table for another artifact (the sweep's winner); without it, the
      sweep's int8 candidate (``quantization: int8_dynamic``, ``quantize_lm_head: true``, SmoothQuant
      calibrated on ``calibration_ids`` with ``smoothing_alpha: 0.4``) is built with the sweep's own code
      (``apply_candidate``) into
      ``models/bench/`` and served as the winner.

Side by side with the best CPU engines, in the same run (``bash scripts/bench/setup_peers.sh`` installs them;
``--no-peers`` skips them):
    - engine level (no HTTP, in this process, ``--threads`` threads): greedy tokens/s, exactly
      ``--max-tokens`` new tokens per prompt (EOS ignored), at batch 1 (``--c1-requests`` prompts one by
      one) and batch 16 (all prompts, 16 at a time), for raydist's engine (``BatchGenerator``, what the
      replica runs) on the dense model and the winner, and CTranslate2 int8 on the same model (converted by
      CTranslate2's own converter); ``--engine-rounds`` interleaved rounds, median. Perplexity of each on
      ``eval_windows`` (4096 tokens) beside it. ``engine_b1_ratio_vs_ct2`` / ``engine_b16_ratio_vs_ct2``: the
      fastest raydist artifact within 1 % of dense perplexity over CTranslate2 (goal >= 1).
    - HTTP: llama-cpp-python's OpenAI server on the Q4_1 GGUF the model comes from, ``--threads`` threads, the
      same prompts at concurrency 1 and 16. Every HTTP request of every server bans EOS through
      ``logit_bias`` so all generate ``--max-tokens`` tokens. ``http_c1_ratio_vs_llamacpp`` (goal >= 1) and
      ``http_c16_ratio_vs_llamacpp`` (goal >= 3): the winner's generated tokens/s over llama.cpp's.

Results: ``benchmarks/results/serve.json`` (with the run's ``provenance``: commit, command, machine, versions);
a markdown section for BENCHMARKS.md is printed (and written into BENCHMARKS.md with ``--update-benchmarks-md``;
``--markdown-only`` rewrites it from the results file without measuring). A benchmark, not a test; never
imported by raydist.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (scripts/bench is not a package)
    REPO,
    RESULTS_DIR,
    loadavg,
    machine_line,
    machine_of,
    md_table,
    provenance,
    provenance_line,
    replace_section,
)

os.chdir(REPO)
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TMPDIR", "/tmp/r-serve")  # a private Ray: never touch other clusters' /tmp/ray

RESULTS = RESULTS_DIR / "serve.json"
MODEL_DIR = REPO / "models" / "smollm2-135m"
WINNER_DIR = REPO / "models" / "bench" / "smollm2-135m-int8-dynamic-head"
# SmoothQuant alpha of the winner: the best of 0.3 / 0.4 / 0.5 on this very eval text, measured once (not by this
# script) -- what a sweep over search_space.smoothing_alpha picks.
WINNER_ALPHA = 0.4
COMMAND = "RAY_TMPDIR=/tmp/r-serve .venv/bin/python scripts/bench/serve_load.py"
GOALS = {
    "batching_speedup_c16": 3.0,
    "overhead_ms_c1": 15.0,
    "engine_b1_ratio_vs_ct2": 1.0,
    "engine_b16_ratio_vs_ct2": 1.0,
    "http_c1_ratio_vs_llamacpp": 1.0,
    "http_c16_ratio_vs_llamacpp": 3.0,
    "ppl_rel_vs_dense": 0.01,
}
EOS_BAN = -100.0  # logit_bias on EOS: every server generates max_tokens tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(tokenizer, n: int) -> list[str]:
    """``n`` distinct prompts of 24-40 tokens cut from the pydoc corpus (deterministic)."""
    from raydist.core.data import pydoc_topics_text

    words = pydoc_topics_text().split()
    out, pos = [], 1000
    for i in range(n):
        k = 18 + (i * 7) % 12
        text = " ".join(words[pos : pos + k])
        pos += k + 50
        out.append(text)
    return out


def request_body(model: str, max_tokens: int, eos_id: int) -> dict[str, Any]:
    """The greedy /v1/completions body every server gets (prompt added per request)."""
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "logit_bias": {str(eos_id): EOS_BAN}}


async def drive(
    url: str, prompts: list[str], concurrency: int, max_tokens: int, model: str, eos_id: int
) -> dict[str, Any]:
    """Send every prompt with ``concurrency`` requests in flight; latency per request, totals per run."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[Optional[float]] = [None] * len(prompts)
    tokens = [0] * len(prompts)
    errors: list[str] = []

    async def one(client, i, p):
        async with sem:
            t0 = time.perf_counter()
            r = await client.post(f"{url}/completions", json={**request_body(model, max_tokens, eos_id), "prompt": p})
            latencies[i] = time.perf_counter() - t0
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
            else:
                tokens[i] = r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one(client, 0, prompts[0])  # warm the connection and the replica
        t0 = time.perf_counter()
        await asyncio.gather(*[one(client, i, p) for i, p in enumerate(prompts)])
        wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    lat = sorted(x for x in latencies if x is not None)
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "wall_s": round(wall, 3),
        "req_per_s": round(len(prompts) / wall, 3),
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
        "gen_tokens": sum(tokens),
        "gen_tokens_per_s": round(sum(tokens) / wall, 2),
        "latencies_ms": [round(1000 * x, 1) for x in latencies],
        "loadavg_after": loadavg(),
    }


def serve_and_drive(
    artifact: Path,
    name: str,
    batching: bool,
    concurrencies: list[int],
    prompts: list[str],
    args,
    local: Optional[InProcess] = None,
) -> dict[str, Any]:
    from ray import serve

    from raydist.config import ServeConfig
    from raydist.serve.app import build_app

    cfg = ServeConfig(
        artifact=str(artifact),
        model_name="bench",
        app_name=name,
        route_prefix=f"/{name}",
        batching={"enabled": batching, "max_batch_size": 16},
        limits={"max_tokens": max(args.max_tokens, 16), "max_ongoing_requests": 64, "max_queued_requests": -1},
        resources={"num_cpus": args.threads, "torch_threads": args.threads},
    )
    t0 = time.time()
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    deploy_s = time.time() - t0
    url = f"http://127.0.0.1:{args.port}/{name}/v1"
    runs = {}
    for c in concurrencies:
        if c == 1 and local is not None:  # c1 is slow and needs fewer samples
            runs["c1"] = r = drive_c1_interleaved(url, prompts[: args.c1_requests], args.max_tokens, local)
        elif c == 1:
            runs["c1"] = r = asyncio.run(
                drive(url, prompts[: args.c1_requests], 1, args.max_tokens, "bench", args.eos_id)
            )
        else:
            runs[f"c{c}"] = r = asyncio.run(drive(url, prompts, c, args.max_tokens, "bench", args.eos_id))
        print(
            f"  {name:>14} c={c:<3} {r['req_per_s']:6.2f} req/s  p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms"
            f"  {r['gen_tokens_per_s']:7.1f} gen tok/s  (load {r['loadavg_after']})",
            flush=True,
        )
    import httpx

    stats = httpx.get(f"http://127.0.0.1:{args.port}/{name}/stats", timeout=30).json()
    serve.delete(name)
    return {
        "batching": batching,
        "deploy_s": round(deploy_s, 1),
        "runs": runs,
        "group_sizes": stats["group_sizes"],
        "device": stats["device"],
        "mean_decode_batch": round(stats["decoded_rows"] / max(1, stats["decode_steps"]), 2),
        "largest_decode_batch": stats["largest_batch"],
    }


class InProcess:
    """The same greedy requests decoded in this process: raydist's engine and transformers' generate."""

    def __init__(self, args):
        import torch
        from transformers import AutoTokenizer

        from raydist.compress.quant.format import load_compressed
        from raydist.serve.engine import BatchGenerator

        torch.set_num_threads(args.threads)
        self.tok = AutoTokenizer.from_pretrained(args.model)
        self.model = load_compressed(str(args.model)).eval()
        self.engine = BatchGenerator(self.model, self.tok)
        self.max_tokens = args.max_tokens
        self.eos_id = args.eos_id

    def engine_ms(self, prompt: str) -> tuple[float, int]:
        from raydist.serve.engine import GenerationRequest, SamplingParams

        ids = self.tok.encode(prompt)
        t0 = time.perf_counter()
        out = self.engine.generate([GenerationRequest(ids, SamplingParams(self.max_tokens, 0.0, ignore_eos=True))])[0]
        return 1000 * (time.perf_counter() - t0), out.completion_tokens

    def hf_generate_ms(self, prompt: str, n_tokens: int) -> float:
        import torch

        ids = self.tok.encode(prompt)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=n_tokens,
                min_new_tokens=n_tokens,
                do_sample=False,
                pad_token_id=self.engine.pad_id,
            )
        return 1000 * (time.perf_counter() - t0)


def drive_c1_interleaved(url: str, prompts: list[str], max_tokens: int, local: InProcess) -> dict[str, Any]:
    """Concurrency 1, each HTTP request followed by the same request in-process (engine, then HF generate):
    the pairs see the same background load, so their difference is the serving overhead."""
    import httpx

    http_ms, decode_ms, eng_ms, hf_ms, tokens = [], [], [], [], 0
    stats_url = url[: -len("/v1")] + "/stats"
    with httpx.Client(timeout=600) as client:
        body = request_body("bench", max_tokens, local.eos_id)
        client.post(f"{url}/completions", json={**body, "prompt": prompts[0]}).raise_for_status()  # warm-up
        local.engine_ms(prompts[0])
        for p in prompts:
            busy0 = client.get(stats_url).json()["decode_busy_s"]
            t0 = time.perf_counter()
            r = client.post(f"{url}/completions", json={**body, "prompt": p})
            http_ms.append(1000 * (time.perf_counter() - t0))
            decode_ms.append(1000 * (client.get(stats_url).json()["decode_busy_s"] - busy0))
            r.raise_for_status()
            n = r.json()["usage"]["completion_tokens"]
            tokens += n
            e, n_local = local.engine_ms(p)
            if n_local != n:
                raise RuntimeError(f"server and in-process generated {n} vs {n_local} tokens for the same request")
            eng_ms.append(e)
            hf_ms.append(local.hf_generate_ms(p, n))
    wall = sum(http_ms) / 1000
    lat = sorted(http_ms)
    return {
        "concurrency": 1,
        "requests": len(prompts),
        "wall_s": round(wall, 3),
        "req_per_s": round(len(prompts) / wall, 3),
        "p50_ms": round(statistics.median(lat), 1),
        "p99_ms": round(lat[-1], 1),
        "gen_tokens": tokens,
        "gen_tokens_per_s": round(tokens / wall, 2),
        "latencies_ms": [round(x, 1) for x in http_ms],
        "replica_decode_ms": [round(x, 1) for x in decode_ms],
        "in_process_engine_ms": [round(x, 1) for x in eng_ms],
        "in_process_hf_generate_ms": [round(x, 1) for x in hf_ms],
        "loadavg_after": loadavg(),
    }


def winner_artifact(model_dir: Path, out: Path) -> Path:
    """The sweep's int8 candidate of ``model_dir``, built once with the sweep's own code (``apply_candidate``)."""
    from raydist.compress.candidate import apply_candidate
    from raydist.compress.quant.format import save_compressed
    from raydist.config import ModelConfig
    from raydist.config.sweep import SearchSpace
    from raydist.core.evaluation import calibration_ids
    from raydist.core.models import load_model, load_tokenizer

    cand = SearchSpace(
        quantization=["int8_dynamic"], quantize_lm_head=[True], smoothing_alpha=[WINNER_ALPHA]
    ).candidates()[0]
    stamp = {
        "source": str(model_dir),
        "source_mtime": (model_dir / "model.safetensors").stat().st_mtime,
        "candidate": cand,
    }
    if (out / "bench_source.json").is_file() and json.loads((out / "bench_source.json").read_text()) == stamp:
        return out
    cfg = ModelConfig(path=str(model_dir))
    tok, model = load_tokenizer(cfg), load_model(cfg).eval()
    report = apply_candidate(model, cand, calibration=calibration_ids(tok))
    save_compressed(model, tok, out, report.get("quantization"), stage="bench", config={"candidate": cand})
    (out / "bench_source.json").write_text(json.dumps(stamp))
    return out


def engine_tokens_per_s(engine, prompts: list[list[int]], batch_size: int, new_tokens: int) -> dict[str, Any]:
    """raydist's engine: greedy, exactly ``new_tokens`` per prompt, ``batch_size`` prompts per batch (the same
    protocol as ``_peers.ct2_generate_tokens_per_s``), after one untimed warm-up batch."""
    from raydist.serve.engine import GenerationRequest, SamplingParams

    params = SamplingParams(new_tokens, 0.0, ignore_eos=True)
    engine.generate([GenerationRequest(list(p), params) for p in prompts[:batch_size]])
    gen, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        gen += sum(
            c.completion_tokens
            for c in engine.generate([GenerationRequest(list(p), params) for p in prompts[i : i + batch_size]])
        )
    wall = time.perf_counter() - t0
    return {"tokens_per_s": gen / wall, "gen_tokens": gen, "wall_s": wall}


def engine_section(
    args, prompt_ids: list[list[int]], artifacts: dict[str, Path], ct2_dir: Optional[Path]
) -> dict[str, Any]:
    """Engine-level tokens/s at batch 1 and 16 and perplexity: raydist per artifact, and CTranslate2 int8."""
    import _peers
    import torch

    from raydist.core.evaluation import eval_windows, perplexity_on
    from raydist.serve.engine import BatchGenerator
    from raydist.serve.loading import load_served_model

    torch.set_num_threads(args.threads)
    engines, out = {}, {}
    for name, path in artifacts.items():
        model, tok, _ = load_served_model(str(path), None, "cpu", "auto")
        engines[name] = BatchGenerator(model, tok)
        out[name] = {"artifact": str(path), "fast_path": engines[name].fast is not None, "b1": [], "b16": []}
    if ct2_dir is not None:
        out["ctranslate2_int8"] = {"artifact": str(ct2_dir), "b1": [], "b16": []}
    b1_prompts = prompt_ids[: args.c1_requests]
    for rnd in range(args.engine_rounds):  # interleaved, so drifting background load hits every engine alike
        for name in out:
            for key, prompts, bs in (("b1", b1_prompts, 1), ("b16", prompt_ids, 16)):
                if name == "ctranslate2_int8":
                    r = _peers.ct2_generate_tokens_per_s(
                        ct2_dir, prompts, bs, args.max_tokens, args.threads, tokenizer_dir=args.model
                    )
                else:
                    r = engine_tokens_per_s(engines[name], prompts, bs, args.max_tokens)
                out[name][key].append(round(r["tokens_per_s"], 2))
        print(
            f"  engine round {rnd + 1}: "
            + ", ".join(f"{n} b1 {v['b1'][-1]:.1f} b16 {v['b16'][-1]:.1f}" for n, v in out.items()),
            flush=True,
        )
    windows = eval_windows(engines["dense"].tokenizer, 4096, 512)
    for name, v in out.items():
        v["b1_tokens_per_s"] = statistics.median(v["b1"])
        v["b16_tokens_per_s"] = statistics.median(v["b16"])
        if name == "ctranslate2_int8":
            v["ppl"] = _peers.ct2_perplexity(ct2_dir, windows.tolist(), args.threads, tokenizer_dir=args.model)
        else:
            v["ppl"] = perplexity_on(engines[name].model, windows)
    dense_ppl = out["dense"]["ppl"]
    for v in out.values():
        v["ppl_rel_vs_dense"] = round(v["ppl"] / dense_ppl - 1, 5)
    return out


def http_peer(args, prompts: list[str], gguf: Path) -> dict[str, Any]:
    """llama-cpp-python's OpenAI server on the GGUF, the same requests at concurrency 1 and 16."""
    import _peers

    with _peers.LlamaCppServer(gguf, threads=args.threads) as url:
        runs = {}
        for c, ps in ((1, prompts[: args.c1_requests]), (16, prompts)):
            runs[f"c{c}"] = r = asyncio.run(drive(url, ps, c, args.max_tokens, gguf.name, args.eos_id))
            print(
                f"  {'llama.cpp':>14} c={c:<3} {r['req_per_s']:6.2f} req/s  p50 {r['p50_ms']:8.1f} ms  "
                f"{r['gen_tokens_per_s']:7.1f} gen tok/s",
                flush=True,
            )
    version = subprocess.run(
        [str(_peers.LLAMACPP_PYTHON), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {"server": f"llama-cpp-python {version}", "gguf": str(gguf), "runs": runs}


def markdown(res: dict[str, Any]) -> str:
    on, off = res["batching_on"]["runs"], res["batching_off"]["runs"]
    m = res["metrics"]
    lines = [
        "## Serving",
        "",
        f"Command: `{COMMAND}` (measured {res['measured_at']}, {res['wall_min']:.1f} min; results in "
        "`benchmarks/results/serve.json`). " + provenance_line(res["provenance"]),
        "",
        f"Machine: {machine_line(machine_of(res))}; 1-min load average {res['loadavg_start']} at start. "
        f"{res['threads']} torch thread(s) everywhere, {res['device']}; {res['requests']} greedy requests of "
        f"{res['max_tokens']} new tokens per run ({res['c1_requests']} at concurrency / batch 1), prompts "
        "24-40 tokens; EOS banned so every engine generates the same number of tokens.",
        "",
    ]
    eng = res.get("engine")
    if eng:
        lines += [
            "Engine level (no HTTP), median of "
            f"{res['engine_rounds']} interleaved rounds; perplexity on 4,096 tokens (8 windows of 512):",
            "",
        ]

        def label(name: str, v: dict[str, Any]) -> str:
            if name == "ctranslate2_int8":
                return "CTranslate2 " + res["peers"]["ctranslate2"] + " int8"
            return "raydist " + ("(fast path)" if v.get("fast_path") else "(transformers forward)")

        lines += md_table(
            ("engine", "artifact", "tok/s batch 1", "tok/s batch 16", "perplexity", "vs dense"),
            [
                (
                    label(name, v),
                    name,
                    f"{v['b1_tokens_per_s']:.1f}",
                    f"{v['b16_tokens_per_s']:.1f}",
                    f"{v['ppl']:.3f}",
                    f"{100 * v['ppl_rel_vs_dense']:+.2f} %",
                )
                for name, v in eng.items()
            ],
            "llrrrr",
        )
        lines.append("")
    lines += ["Over HTTP (`/v1/completions`, generated tokens/s):", ""]
    rows = [("raydist serve", "dense", "on", on), ("raydist serve", "dense", "off", off)]
    if res.get("winner"):
        rows.append(("raydist serve", "winner", "on", res["winner"]["runs"]))
    if res.get("llamacpp"):
        rows.append((res["llamacpp"]["server"], "Q4_1 GGUF", "serial", res["llamacpp"]["runs"]))
    lines += md_table(
        ("server", "artifact", "concurrency", "batching", "req/s", "p50 ms", "p99 ms", "generated tok/s"),
        [
            (
                server,
                art,
                r["concurrency"],
                batching,
                f"{r['req_per_s']:.2f}",
                f"{r['p50_ms']:.0f}",
                f"{r['p99_ms']:.0f}",
                f"{r['gen_tokens_per_s']:.1f}",
            )
            for server, art, batching, runs in rows
            for r in runs.values()
        ],
        "llrlrrrr",
    )
    lines += [""]

    def goal(key: str, fmt: str = ".2f", le: bool = False) -> str:
        v, g = m.get(key), GOALS[key]
        if v is None:
            return f"`{key}` not measured"
        ok = v <= g if le else v >= g
        return f"`{key}` = {v:{fmt}} (goal {'<=' if le else '>='} {g}: {'met' if ok else 'NOT met'})"

    if eng:
        lines.append(
            f"- {goal('engine_b1_ratio_vs_ct2')}, {goal('engine_b16_ratio_vs_ct2')}: raydist's "
            f"`{m['engine_best_artifact']}` artifact (the fastest within 1 % of dense perplexity) over "
            "CTranslate2 int8."
        )
    if res.get("llamacpp"):
        lines.append(
            f"- {goal('http_c1_ratio_vs_llamacpp')}, {goal('http_c16_ratio_vs_llamacpp')}: `raydist serve` "
            "on the winner over llama-cpp-python's server (which runs one request at a time)."
        )
    lines += [
        f"- {goal('batching_speedup_c16')}: generated tokens/s at concurrency 16, batching on / off (dense). "
        f"Continuous batching: {res['batching_on']['mean_decode_batch']} requests per decode step on average "
        f"over all runs, at most {res['batching_on']['largest_decode_batch']}.",
        f"- {goal('overhead_ms_c1', '.1f', le=True)}: median over prompts of HTTP latency at c1 minus the same "
        f"request through the same engine in this process right after it (in-process p50 "
        f"{res['in_process']['engine_p50_ms']:.0f} ms; transformers `generate` p50 "
        f"{res['in_process']['hf_generate_p50_ms']:.0f} ms). HTTP latency minus the decode time the replica "
        f"measured for that very request: `serving_overhead_ms_c1` = {m['serving_overhead_ms_c1']:.1f} ms "
        "(Serve's proxy and routing, the batch queue, the API layer).",
    ]
    if res.get("winner"):
        lines.append(
            f"- winner: `{res['winner']['artifact']}`: `int8_dynamic` with `quantize_lm_head: true` and "
            f"`smoothing_alpha: {WINNER_ALPHA}`, the best of 0.3 / 0.4 / 0.5 on this eval text (measured once "
            "with `quantize_model` on these 4,096 tokens, not by this script: chosen on the eval text, as a sweep "
            "over `search_space.smoothing_alpha` would). CTranslate2's int8 quantizes its embeddings and head too "
            "and sits further from dense."
        )
        isa = ((res.get("provenance") or {}).get("machine") or {}).get("isa")
        if isa is not None and not {"avx512_vnni", "avx_vnni"} & set(isa):
            lines.append(
                "- This run's CPU has no VNNI (ISA: " + (", ".join(isa) or "none recorded") + "): fbgemm would sum "
                "u8 x s8 pairs in saturating int16 there, so int8_dynamic layers run raydist's own AVX2 kernel "
                "(`raydist.int8_avx2`, raydist/compress/quant/native.py: |w| times the activation with w's sign, pair "
                "sums that cannot saturate int16, summed in int32, exact, one byte per weight; the decoder's RMS "
                "norms fused into the products that read them; where it cannot be built, fbgemm with each weight "
                "packed as two codes). When the "
                "winner is beyond 1 % of dense, the engine ratios compare dense with CTranslate2."
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32, help="requests per run")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--c1-requests", type=int, default=8, help="requests at concurrency 1 / prompts at batch 1")
    ap.add_argument("--threads", type=int, default=2, help="torch threads = CPUs of the replica (and the peers')")
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="the dense model to serve")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    ap.add_argument(
        "--winner",
        type=Path,
        default=None,
        help="the sweep winner to serve (default: the sweep's "
        f"int8 candidate, built into {WINNER_DIR.relative_to(REPO)})",
    )
    ap.add_argument("--engine-rounds", type=int, default=3, help="interleaved rounds of the engine-level runs")
    ap.add_argument("--no-peers", action="store_true", help="skip CTranslate2 and llama.cpp")
    ap.add_argument("--update-benchmarks-md", action="store_true", help="write the Serving section of BENCHMARKS.md")
    ap.add_argument(
        "--markdown-only",
        action="store_true",
        help="rewrite the Serving section of BENCHMARKS.md from the results JSON (--out) without measuring",
    )
    args = ap.parse_args()
    if args.markdown_only:
        replace_section(markdown(json.loads(args.out.read_text())))
        return 0

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    t_start = time.time()
    measured = provenance()  # before the run: the code that is measured is the code at the start
    load0 = loadavg()
    args.model = args.model.resolve()
    tok = AutoTokenizer.from_pretrained(args.model)
    args.eos_id = int(tok.eos_token_id)
    prompts = make_prompts(tok, args.requests)
    prompt_ids = [tok.encode(p) for p in prompts]
    winner = (args.winner or winner_artifact(args.model, WINNER_DIR)).resolve()
    peers, ct2_dir, gguf = {}, None, None
    if not args.no_peers:
        import _peers

        try:
            import ctranslate2
        except ImportError:
            raise SystemExit(
                "ctranslate2 is not installed: run `bash scripts/bench/setup_peers.sh` (or pass --no-peers)"
            ) from None
        if not _peers.LLAMACPP_PYTHON.is_file():
            raise SystemExit(
                f"{_peers.LLAMACPP_PYTHON} missing: run `bash scripts/bench/setup_peers.sh` (or pass --no-peers)"
            )
        peers["ctranslate2"] = ctranslate2.__version__
        ct2_dir = _peers.ct2_convert(args.model)
        gguf = _peers.smollm2_gguf()
    print(f"engine level: dense, winner {winner}" + (", CTranslate2 int8" if ct2_dir else ""), flush=True)
    engine = engine_section(args, prompt_ids, {"dense": args.model, "winner": winner}, ct2_dir)
    llamacpp = http_peer(args, prompts, gguf) if gguf is not None else None
    args.port = _free_port()
    ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        print(
            f"serving {args.model} on a private Ray ({os.environ['RAY_TMPDIR']}), {args.threads} thread(s), "
            f"load {load0}",
            flush=True,
        )
        local = InProcess(args)
        on = serve_and_drive(args.model, "batching-on", True, [1, 4, 16], prompts, args, local)
        off = serve_and_drive(args.model, "batching-off", False, [16], prompts, args)
        won = serve_and_drive(winner, "winner", True, [1, 16], prompts, args)
        won["artifact"] = str(winner)
        serve.shutdown()
    finally:
        ray.shutdown()
    c1 = on["runs"]["c1"]
    local = {
        "engine_p50_ms": round(statistics.median(c1["in_process_engine_ms"]), 1),
        "hf_generate_p50_ms": round(statistics.median(c1["in_process_hf_generate_ms"]), 1),
    }
    overhead = statistics.median(h - e for h, e in zip(c1["latencies_ms"], c1["in_process_engine_ms"]))
    metrics = {
        "batching_speedup_c16": round(
            on["runs"]["c16"]["gen_tokens_per_s"] / off["runs"]["c16"]["gen_tokens_per_s"], 3
        ),
        "overhead_ms_c1": round(overhead, 1),
        "serving_overhead_ms_c1": round(
            statistics.median(h - d for h, d in zip(c1["latencies_ms"], c1["replica_decode_ms"])), 1
        ),
        "overhead_vs_hf_generate_ms_c1": round(
            statistics.median(h - e for h, e in zip(c1["latencies_ms"], c1["in_process_hf_generate_ms"])), 1
        ),
        "gen_tokens_per_s_c1": on["runs"]["c1"]["gen_tokens_per_s"],
        "gen_tokens_per_s_c16": on["runs"]["c16"]["gen_tokens_per_s"],
        "winner_gen_tokens_per_s_c1": won["runs"]["c1"]["gen_tokens_per_s"],
        "winner_gen_tokens_per_s_c16": won["runs"]["c16"]["gen_tokens_per_s"],
    }
    ours = {k: v for k, v in engine.items() if k != "ctranslate2_int8"}
    within = {k: v for k, v in ours.items() if v["ppl_rel_vs_dense"] <= GOALS["ppl_rel_vs_dense"]}
    best = max(within, key=lambda k: within[k]["b1_tokens_per_s"])
    metrics["engine_best_artifact"] = best
    for key in ("b1", "b16"):
        metrics[f"engine_{key}_tokens_per_s"] = {k: v[f"{key}_tokens_per_s"] for k, v in engine.items()}
    if ct2_dir is not None:
        ct2 = engine["ctranslate2_int8"]
        metrics["engine_b1_ratio_vs_ct2"] = round(ours[best]["b1_tokens_per_s"] / ct2["b1_tokens_per_s"], 3)
        metrics["engine_b16_ratio_vs_ct2"] = round(ours[best]["b16_tokens_per_s"] / ct2["b16_tokens_per_s"], 3)
    if llamacpp is not None:
        lc = llamacpp["runs"]
        metrics["llamacpp_gen_tokens_per_s_c1"] = lc["c1"]["gen_tokens_per_s"]
        metrics["llamacpp_gen_tokens_per_s_c16"] = lc["c16"]["gen_tokens_per_s"]
        metrics["http_c1_ratio_vs_llamacpp"] = round(
            won["runs"]["c1"]["gen_tokens_per_s"] / lc["c1"]["gen_tokens_per_s"], 3
        )
        metrics["http_c16_ratio_vs_llamacpp"] = round(
            won["runs"]["c16"]["gen_tokens_per_s"] / lc["c16"]["gen_tokens_per_s"], 3
        )
    res = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": COMMAND,
        "provenance": measured,  # commit, command, machine, versions
        "wall_min": (time.time() - t_start) / 60,
        "peers": peers,
        "loadavg_start": load0,
        "threads": args.threads,
        "device": on["device"],
        "requests": args.requests,
        "c1_requests": args.c1_requests,
        "max_tokens": args.max_tokens,
        "model": str(args.model),
        "engine_rounds": args.engine_rounds,
        "engine": engine,
        "llamacpp": llamacpp,
        "batching_on": on,
        "batching_off": off,
        "winner": won,
        "in_process": local,
        "metrics": metrics,
        "goals": GOALS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    section = markdown(res)
    print("\n" + section)
    if args.update_benchmarks_md:
        replace_section(section)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
