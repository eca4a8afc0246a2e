"""The shipped SmolLM2 pipeline, run as a user runs it, timed stage by stage.

    .venv/bin/python scripts/bench/pipeline_smollm2.py          # ~15-20 min on a quiet 2-core box

It runs ``python -m raydist pipeline -c jobs/pipeline_smollm2.yaml`` unchanged except where it lives
(``output_dir`` in a temporary directory, a free HTTP port), in its own embedded Ray, waits until the chain
has served the sweep's winner, asks it one chat question through the unmodified ``openai`` client, stops the
server with SIGINT as Ctrl-C would, and records what ``lineage.json`` says of every stage (status, wall time,
quality, size) plus the served reply.

Results: ``benchmarks/results/pipeline.json`` (with the run's ``provenance``: commit, command, machine,
versions) and the "Pipeline (SmolLM2)" section of ``BENCHMARKS.md`` (``--markdown-only`` rewrites it from the
results file without measuring). A benchmark, not a test; never imported by raydist.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (scripts/bench is not a package)
    BENCHMARKS_MD,
    REPO,
    RESULTS_DIR,
    machine_line,
    machine_of,
    provenance,
    provenance_line,
    replace_section,
    say,
)

sys.path.insert(0, str(REPO))
RESULTS = RESULTS_DIR / "pipeline.json"
SPEC = "jobs/pipeline_smollm2.yaml"
SECTION = "## Pipeline (SmolLM2)"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    from raydist.jobs.pipeline import format_summary

    measured = provenance()  # before the run: the code that is measured is the code at the start
    work = Path(tempfile.mkdtemp(prefix="raydist-bench-pipeline-"))
    port = free_port()
    cmd = [sys.executable, "-m", "raydist", "pipeline", "-c", SPEC, f"output_dir={work}", f"serve.http.port={port}"]
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rbp", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    log = work / "pipeline.log"
    lineage_file = work / "pipeline-smollm2" / "lineage.json"
    say(f"{' '.join(cmd)}  (log {log})")
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        lineage, seen = None, ""
        try:
            while proc.poll() is None and time.time() - t0 < args.timeout_s:
                time.sleep(5)
                if lineage_file.is_file():
                    lineage = json.loads(lineage_file.read_text())
                    status = " ".join(f"{s}:{e['status']}" for s, e in lineage["stages"].items())
                    if status != seen:
                        say(f"{time.time() - t0:5.0f}s  {status}")
                        seen = status
                    if lineage["stages"].get("serve", {}).get("status") == "done":
                        break
            if proc.poll() is not None:
                raise SystemExit(f"the pipeline exited with {proc.returncode}; see {log}:\n{log.read_text()[-4000:]}")
            if not lineage or lineage["stages"]["serve"]["status"] != "done":
                raise SystemExit(f"the pipeline did not serve within {args.timeout_s}s; see {log}")
            chain_s = time.time() - t0
            import openai

            serve = lineage["stages"]["serve"]
            client = openai.OpenAI(base_url=serve["url"], api_key="unused", max_retries=0, timeout=120)
            question = "Name three uses of a Python dictionary."
            t1 = time.time()
            reply = client.chat.completions.create(
                model=lineage["pipeline"],
                messages=[{"role": "user", "content": question}],
                max_tokens=48,
                temperature=0,
            )
            reply_s = time.time() - t1
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in the terminal: the pipeline stops serving
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    say(f"served the winner after {chain_s / 60:.1f} min; exit {proc.returncode} after SIGINT")
    print(format_summary(lineage), flush=True)
    stages = {
        s: {k: e.get(k) for k in ("status", "wall_s", "metrics", "bytes_on_disk", "num_parameters")}
        for s, e in lineage["stages"].items()
    }
    return {
        "provenance": measured,
        "measured_at": measured["measured_at"],
        "spec": SPEC,
        "chain_to_served_s": chain_s,
        "stage_wall_s": {s: e["wall_s"] for s, e in stages.items()},
        "stages": stages,
        "winner": lineage["stages"]["sweep"].get("artifact"),
        "chat_question": question,
        "chat_reply": reply.choices[0].message.content,
        "chat_completion_tokens": reply.usage.completion_tokens,
        "chat_latency_s": reply_s,
        "exit_after_sigint": proc.returncode,
        "summary": format_summary(lineage),
    }


def markdown(r: dict) -> str:
    p = r["provenance"]
    walls = ", ".join(f"{s} {w / 60:.1f} min" for s, w in r["stage_wall_s"].items() if w is not None)
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{p['command']}` (results in `benchmarks/results/pipeline.json`). This section is written by "
            "the script.",
            "",
            f"{provenance_line(p, with_command=False)} Machine: {machine_line(machine_of(r))}. "
            f"Measured {r['measured_at']}.",
            "",
            f"`raydist pipeline -c {r['spec']}` from nothing to the sweep's winner answering on Ray Serve: "
            f"**{r['chain_to_served_s'] / 60:.1f} min** ({walls}).",
            "",
            "```",
            r["summary"],
            "```",
            "",
            f'The served winner\'s greedy answer to "{r["chat_question"]}" ({r["chat_completion_tokens"]} tokens, '
            f"{r['chat_latency_s']:.1f} s): {json.dumps(r['chat_reply'])}",
            "",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout-s", type=float, default=3600, help="give up when the chain has not served by then")
    ap.add_argument("--no-write", action="store_true", help="print only; leave the results file and BENCHMARKS.md")
    ap.add_argument(
        "--markdown-only",
        action="store_true",
        help=f"rewrite the {SECTION[3:]} section of BENCHMARKS.md from {RESULTS.name} without measuring",
    )
    args = ap.parse_args()
    if args.markdown_only:
        replace_section(markdown(json.loads(RESULTS.read_text())))
        say(f"rewrote the '{SECTION[3:]}' section of {BENCHMARKS_MD.name} from {RESULTS.relative_to(REPO)}")
        return
    r = run(args)
    if not args.no_write:
        RESULTS.write_text(json.dumps(r, indent=2) + "\n")
        replace_section(markdown(r))
        say(f"wrote {RESULTS.relative_to(REPO)} and the '{SECTION[3:]}' section of {BENCHMARKS_MD.name}")


if __name__ == "__main__":
    main()
