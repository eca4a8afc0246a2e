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
    - ``gen_tokens_per_s_c16`` against the peer figure from issue 5: llama-cpp-python's OpenAI server on
      SmolLM2's Q4_1 GGUF, 2 threads, 32 requests of max_tokens 32: 45 tok/s at c1, 40 at c16.
    - ``--winner DIR`` adds the same load table for another artifact (e.g. the sweep's winner).

Results: ``benchmarks/results/serve.json``; a markdown section for BENCHMARKS.md is printed (and written
into BENCHMARKS.md with ``--update-benchmarks-md``). A benchmark, not a test; never imported by raydist.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
os.chdir(REPO)
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TMPDIR", "/tmp/r-serve")  # a private Ray: never touch other clusters' /tmp/ray

RESULTS = REPO / "benchmarks" / "results" / "serve.json"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
MODEL_DIR = REPO / "models" / "smollm2-135m"
COMMAND = "RAY_TMPDIR=/tmp/r-serve .venv/bin/python scripts/bench/serve_load.py"
PEER = {"gen_tokens_per_s_c1": 45.0, "gen_tokens_per_s_c16": 40.0,
        "what": "llama-cpp-python OpenAI server, SmolLM2-135M-Instruct Q4_1 GGUF, 2 threads, 32 requests x max_tokens 32"}
GOALS = {"batching_speedup_c16": 3.0, "overhead_ms_c1": 15.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def make_prompts(tokenizer, n: int) -> list[str]:
    """``n`` distinct prompts of 24-40 tokens cut from the pydoc corpus (deterministic)."""
    from raydist.components.data import pydoc_topics_text

    words = pydoc_topics_text().split()
    out, pos = [], 1000
    for i in range(n):
        k = 18 + (i * 7) % 12
        text = " ".join(words[pos:pos + k])
        pos += k + 50
        out.append(text)
    return out


async def drive(url: str, prompts: list[str], concurrency: int, max_tokens: int, model: str) -> dict[str, Any]:
    """Send every prompt with ``concurrency`` requests in flight; latency per request, totals per run."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[Optional[float]] = [None] * len(prompts)
    tokens = [0] * len(prompts)
    errors: list[str] = []

    async def one(client, i, p):
        async with sem:
            t0 = time.perf_counter()
            r = await client.post(f"{url}/completions", json={"model": model, "prompt": p, "max_tokens": max_tokens,
                                                              "temperature": 0})
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
        "concurrency": concurrency, "requests": len(prompts), "wall_s": round(wall, 3),
        "req_per_s": round(len(prompts) / wall, 3),
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
        "gen_tokens": sum(tokens), "gen_tokens_per_s": round(sum(tokens) / wall, 2),
        "latencies_ms": [round(1000 * x, 1) for x in latencies],
        "loadavg_after": _loadavg(),
    }


def serve_and_drive(artifact: Path, name: str, batching: bool, concurrencies: list[int], prompts: list[str],
                    args, local: Optional[InProcess] = None) -> dict[str, Any]:
    from ray import serve

    from raydist.config import ServeConfig
    from raydist.serve.app import build_app

    cfg = ServeConfig(
        artifact=str(artifact), model_name="bench", app_name=name, route_prefix=f"/{name}",
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
            runs["c1"] = r = drive_c1_interleaved(url, prompts[:args.c1_requests], args.max_tokens, local)
        else:
            runs[f"c{c}"] = r = asyncio.run(drive(url, prompts, c, args.max_tokens, "bench"))
        print(f"  {name:>14} c={c:<3} {r['req_per_s']:6.2f} req/s  p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms"
              f"  {r['gen_tokens_per_s']:7.1f} gen tok/s  (load {r['loadavg_after']})", flush=True)
    import httpx

    stats = httpx.get(f"http://127.0.0.1:{args.port}/{name}/stats", timeout=30).json()
    serve.delete(name)
    return {"batching": batching, "deploy_s": round(deploy_s, 1), "runs": runs,
            "group_sizes": stats["group_sizes"], "device": stats["device"],
            "mean_decode_batch": round(stats["decoded_rows"] / max(1, stats["decode_steps"]), 2),
            "largest_decode_batch": stats["largest_batch"]}


class InProcess:
    """The same greedy requests decoded in this process: raydist's engine and transformers' generate."""

    def __init__(self, args):
        import torch
        from transformers import AutoTokenizer

        from raydist.serve.engine import BatchGenerator
        from raydist.serve.loading import _load_artifact

        torch.set_num_threads(args.threads)
        self.tok = AutoTokenizer.from_pretrained(args.model)
        self.model = _load_artifact(str(args.model)).eval()
        self.engine = BatchGenerator(self.model, self.tok)
        self.max_tokens = args.max_tokens

    def engine_ms(self, prompt: str) -> tuple[float, int]:
        from raydist.serve.engine import GenerationRequest, SamplingParams

        ids = self.tok.encode(prompt)
        t0 = time.perf_counter()
        out = self.engine.generate([GenerationRequest(ids, SamplingParams(self.max_tokens, 0.0))])[0]
        return 1000 * (time.perf_counter() - t0), out.completion_tokens

    def hf_generate_ms(self, prompt: str, n_tokens: int) -> float:
        import torch

        ids = self.tok.encode(prompt)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                pad_token_id=self.engine.pad_id)
        return 1000 * (time.perf_counter() - t0)


def drive_c1_interleaved(url: str, prompts: list[str], max_tokens: int, local: InProcess) -> dict[str, Any]:
    """Concurrency 1, each HTTP request followed by the same request in-process (engine, then HF generate):
    the pairs see the same background load, so their difference is the serving overhead."""
    import httpx

    http_ms, decode_ms, eng_ms, hf_ms, tokens = [], [], [], [], 0
    stats_url = url[:-len("/v1")] + "/stats"
    with httpx.Client(timeout=600) as client:
        body = {"model": "bench", "max_tokens": max_tokens, "temperature": 0}
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
        "concurrency": 1, "requests": len(prompts), "wall_s": round(wall, 3), "req_per_s": round(len(prompts) / wall, 3),
        "p50_ms": round(statistics.median(lat), 1), "p99_ms": round(lat[-1], 1), "gen_tokens": tokens,
        "gen_tokens_per_s": round(tokens / wall, 2), "latencies_ms": [round(x, 1) for x in http_ms],
        "replica_decode_ms": [round(x, 1) for x in decode_ms],
        "in_process_engine_ms": [round(x, 1) for x in eng_ms], "in_process_hf_generate_ms": [round(x, 1) for x in hf_ms],
        "loadavg_after": _loadavg(),
    }


def markdown(res: dict[str, Any]) -> str:
    on, off = res["batching_on"]["runs"], res["batching_off"]["runs"]
    lines = [
        "## Serving", "",
        f"Command: `{COMMAND}` (measured {res['measured_at']}, {res['wall_min']:.1f} min; results in "
        "`benchmarks/results/serve.json`).", "",
        f"Machine: {res['machine']}; shared with other jobs (1-min load average {res['loadavg_start']} at start). "
        f"One replica, {res['threads']} torch thread(s), {res['device']}; {res['requests']} greedy /v1/completions "
        f"requests of max_tokens {res['max_tokens']} per run ({res['c1_requests']} at concurrency 1), prompts "
        "24-40 tokens.", "",
        "| concurrency | batching | req/s | p50 ms | p99 ms | generated tok/s |", "|---:|---|---:|---:|---:|---:|",
    ]
    for label, runs in (("on", on), ("off", off)):
        for k, r in runs.items():
            lines.append(f"| {r['concurrency']} | {label} | {r['req_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                         f"{r['gen_tokens_per_s']:.1f} |")
    m = res["metrics"]
    lines += [
        "",
        f"- `batching_speedup_c16` = {m['batching_speedup_c16']:.2f} (goal >= {GOALS['batching_speedup_c16']}). "
        f"Batching on: continuous (groups formed by `@serve.batch` join the running decode batch); "
        f"{res['batching_on']['mean_decode_batch']} requests per decode step on average over all runs, at most "
        f"{res['batching_on']['largest_decode_batch']}; group sizes {res['batching_on']['group_sizes']}.",
        f"- `overhead_ms_c1` = {m['overhead_ms_c1']:.1f} ms (goal <= {GOALS['overhead_ms_c1']}): median over prompts of "
        f"HTTP latency at c1 minus the same request through the same engine in-process "
        f"(in-process p50 {res['in_process']['engine_p50_ms']:.0f} ms; transformers `generate` p50 "
        f"{res['in_process']['hf_generate_p50_ms']:.0f} ms; overhead vs `generate` "
        f"{m['overhead_vs_hf_generate_ms_c1']:.1f} ms). On a shared box the replica's own decode time of the "
        f"same request swings by more than that (other jobs' load moves between the two runs); HTTP latency "
        f"minus the decode time the replica measured for that very request is "
        f"`serving_overhead_ms_c1` = {m['serving_overhead_ms_c1']:.1f} ms (Serve's proxy and routing, the "
        f"batch queue wait, the API layer).",
        f"- `gen_tokens_per_s_c16` = {m['gen_tokens_per_s_c16']:.1f} vs the peer's {PEER['gen_tokens_per_s_c16']:.0f} "
        f"({PEER['what']}; {PEER['gen_tokens_per_s_c1']:.0f} at c1).",
    ]
    if res.get("winner"):
        w = res["winner"]["runs"]
        lines.append(f"- winner `{res['winner']['artifact']}`: c16 {w['c16']['gen_tokens_per_s']:.1f} gen tok/s vs dense "
                     f"{on['c16']['gen_tokens_per_s']:.1f}.")
    else:
        lines.append("- dense vs sweep winner: no winner artifact given (`--winner DIR`), not measured.")
    return "\n".join(lines) + "\n"


def update_benchmarks_md(section: str) -> None:
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    start = text.find("## Serving")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    BENCHMARKS_MD.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=32, help="requests per run (the peer used 32)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (the peer used 32)")
    ap.add_argument("--c1-requests", type=int, default=8, help="requests of the concurrency-1 run and the in-process "
                    "baseline (paired with it)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads = CPUs of the replica")
    ap.add_argument("--model", type=Path, default=MODEL_DIR, help="the dense model to serve")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    ap.add_argument("--winner", type=Path, default=None, help="also load-test this artifact (sweep winner)")
    ap.add_argument("--update-benchmarks-md", action="store_true", help="write the Serving section of BENCHMARKS.md")
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve
    from transformers import AutoTokenizer

    t_start = time.time()
    load0 = _loadavg()
    args.model = args.model.resolve()
    prompts = make_prompts(AutoTokenizer.from_pretrained(args.model), args.requests)
    args.port = _free_port()
    ray.init(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        print(f"serving {args.model} on a private Ray ({os.environ['RAY_TMPDIR']}), {args.threads} thread(s), "
              f"load {load0}", flush=True)
        local = InProcess(args)
        on = serve_and_drive(args.model, "batching-on", True, [1, 4, 16], prompts, args, local)
        off = serve_and_drive(args.model, "batching-off", False, [16], prompts, args)
        winner = None
        if args.winner is not None:
            winner = serve_and_drive(args.winner.resolve(), "winner", True, [1, 16], prompts, args)
            winner["artifact"] = str(args.winner)
        serve.shutdown()
    finally:
        ray.shutdown()
    c1 = on["runs"]["c1"]
    local = {"engine_p50_ms": round(statistics.median(c1["in_process_engine_ms"]), 1),
             "hf_generate_p50_ms": round(statistics.median(c1["in_process_hf_generate_ms"]), 1)}
    print(f"  in-process engine p50 {local['engine_p50_ms']:.0f} ms, transformers generate p50 "
          f"{local['hf_generate_p50_ms']:.0f} ms (interleaved with the c1 HTTP requests)", flush=True)
    overhead = statistics.median(h - e for h, e in zip(c1["latencies_ms"], c1["in_process_engine_ms"]))
    metrics = {
        "batching_speedup_c16": round(on["runs"]["c16"]["gen_tokens_per_s"] / off["runs"]["c16"]["gen_tokens_per_s"], 3),
        "overhead_ms_c1": round(overhead, 1),
        "serving_overhead_ms_c1": round(statistics.median(
            h - d for h, d in zip(c1["latencies_ms"], c1["replica_decode_ms"])), 1),
        "overhead_vs_hf_generate_ms_c1": round(statistics.median(
            h - e for h, e in zip(c1["latencies_ms"], c1["in_process_hf_generate_ms"])), 1),
        "gen_tokens_per_s_c1": on["runs"]["c1"]["gen_tokens_per_s"],
        "gen_tokens_per_s_c16": on["runs"]["c16"]["gen_tokens_per_s"],
        "gen_tokens_per_s_c16_vs_peer": round(on["runs"]["c16"]["gen_tokens_per_s"] / PEER["gen_tokens_per_s_c16"], 2),
    }
    res = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "command": COMMAND, "wall_min": (time.time() - t_start) / 60,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                   f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
        "loadavg_start": load0, "threads": args.threads, "device": on["device"], "requests": args.requests,
        "c1_requests": args.c1_requests, "max_tokens": args.max_tokens, "model": str(args.model),
        "batching_on": on, "batching_off": off, "winner": winner, "in_process": local,
        "metrics": metrics, "goals": GOALS, "peer": PEER,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    section = markdown(res)
    print("\n" + section)
    if args.update_benchmarks_md:
        update_benchmarks_md(section)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
