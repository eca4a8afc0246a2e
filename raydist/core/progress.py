"""Console progress (step, loss, tokens/s, ETA), the metrics log, and the loss-curve PNG."""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional


def console(line: str) -> None:
    """Print one line from a worker. Writes to the stream directly: Ray Train 2.60 patches ``print`` in
    workers to tee into its logger as well, so a plain print reaches the driver's console twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps({"time": time.time(), **record}) + "\n")


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``. After a resume some steps appear twice (logged, then lost with the
    crash, then redone); the later record of each (step, kind) wins."""
    p = Path(path)
    if not p.is_file():
        return []
    latest: dict[tuple, dict[str, Any]] = {}
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        kind = "event" if "event" in rec else ("eval" if "eval_loss" in rec else "train")
        latest[(kind, rec.get("step"), rec.get("event"))] = rec
    return sorted(latest.values(), key=lambda r: (r.get("step", 0), r["time"]))


class ProgressPrinter:
    """Prints ``step 12/100 | loss 3.2140 | lr 1.9e-04 | 1,234 tok/s | ETA 0:01:23`` on rank 0.

    Throughput excludes the first step after (re)start, which pays for kernel warm-up and data start-up.
    """

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.total = total_steps
        self.enabled = enabled
        self.last_time = time.perf_counter()
        self.steps_timed = 0
        self.time_sum = 0.0
        self.tokens_sum = 0
        self.first = True

    def update(self, step: int, *, loss: float, lr: float, tokens: int) -> Optional[float]:
        now = time.perf_counter()
        dt, self.last_time = now - self.last_time, now
        tok_s = tokens / dt if dt > 0 else None
        if self.first:
            self.first = False
        else:
            self.steps_timed += 1
            self.time_sum += dt
            self.tokens_sum += tokens
        if self.enabled:
            per_step = self.time_sum / self.steps_timed if self.steps_timed else dt
            eta = timedelta(seconds=int(per_step * (self.total - step)))
            console(
                f"[raydist] step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{(tok_s or 0):,.0f} tok/s | ETA {eta}"
            )
        return tok_s

    def mean_tokens_per_s(self) -> Optional[float]:
        return self.tokens_sum / self.time_sum if self.time_sum else None


def plot_loss_curve(history: list[dict[str, Any]], out: str | Path, title: str = "") -> Optional[Path]:
    """Train loss per step and eval loss at each evaluation, as a PNG. Returns None without data."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "eval_loss" not in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
