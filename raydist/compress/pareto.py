"""Multi-objective selection: the Pareto front of measured candidates and the winner policy.

Written by hand on purpose: Optuna computes a front only for its own studies (and not for grid / random
search or for trials ASHA stopped), while the sweep report must give one front over every completed
candidate, whatever searched for it. It is O(n²) over a few dozen candidates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

# (key, direction): quality = perplexity (lower), size = bytes on disk (lower), speed = tokens/s (higher).
DEFAULT_OBJECTIVES: tuple[tuple[str, str], ...] = (("ppl", "min"), ("disk_bytes", "min"), ("tokens_per_s", "max"))


def _values(point: dict[str, Any], objectives: Sequence[tuple[str, str]]) -> Optional[tuple[float, ...]]:
    """The point's objectives as numbers to minimise, or None when one is missing / not finite."""
    out = []
    for key, direction in objectives:
        v = point.get(key)
        if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        out.append(v if direction == "min" else -v)
    return tuple(out)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when ``a`` is no worse than ``b`` in every (minimised) objective and better in at least one."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(
    points: Sequence[dict[str, Any]], objectives: Sequence[tuple[str, str]] = DEFAULT_OBJECTIVES
) -> list[int]:
    """Indices of the non-dominated points (in input order).

    Args:
        points: dicts holding every objective's key; points missing one (or with NaN/inf) are never on it.
        objectives: ``(key, "min" | "max")`` pairs.

    Raises:
        ValueError: an objective direction other than min/max.
    """
    for key, direction in objectives:
        if direction not in ("min", "max"):
            raise ValueError(f"objective {key!r}: direction must be 'min' or 'max', got {direction!r}")
    vals = [_values(p, objectives) for p in points]
    front = []
    for i, v in enumerate(vals):
        if v is None:
            continue
        if not any(w is not None and j != i and dominates(w, v) for j, w in enumerate(vals)):
            front.append(i)
    return front


def choose_winner(
    points: Sequence[dict[str, Any]],
    *,
    base_ppl: float,
    max_quality_loss_pct: float,
    prefer: str = "smallest",
) -> tuple[Optional[int], str]:
    """The policy: among candidates whose perplexity is at most ``max_quality_loss_pct`` % above the base
    model's, the smallest on disk (``prefer="smallest"``) or the fastest (``"fastest"``, tokens/s at batch
    1); ties go to the better perplexity.

    Returns:
        ``(index or None, reason)``; None with a reason naming the best quality seen when no candidate met
        the policy.
    """
    if prefer not in ("smallest", "fastest"):
        raise ValueError(f"prefer must be 'smallest' or 'fastest', got {prefer!r}")
    limit = base_ppl * (1 + max_quality_loss_pct / 100)
    ok = [i for i, p in enumerate(points) if _values(p, DEFAULT_OBJECTIVES) is not None and p["ppl"] <= limit]
    if not ok:
        measured = [p["ppl"] for p in points if _values(p, DEFAULT_OBJECTIVES) is not None]
        best = f"; the best candidate measured ppl {min(measured):.4g}" if measured else "; no candidate completed"
        return None, (
            f"no candidate met the policy: perplexity within {max_quality_loss_pct:g} % of the base "
            f"model's {base_ppl:.4g} (<= {limit:.4g}){best}"
        )
    if prefer == "smallest":
        key = lambda i: (points[i]["disk_bytes"], points[i]["ppl"])  # noqa: E731
    else:
        key = lambda i: (-points[i]["tokens_per_s"], points[i]["ppl"])  # noqa: E731
    i = min(ok, key=key)
    return i, (
        f"{prefer} of the {len(ok)} candidate(s) within {max_quality_loss_pct:g} % of the base "
        f"perplexity {base_ppl:.4g}"
    )


def plot_pareto(
    points: Sequence[dict[str, Any]],
    front: Sequence[int],
    out: str | Path,
    *,
    base: Optional[dict[str, Any]] = None,
    winner: Optional[int] = None,
) -> Path:
    """Scatter of perplexity vs. size (marker colour = tokens/s), the front joined, the winner ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [i for i, p in enumerate(points) if _values(p, DEFAULT_OBJECTIVES) is not None]
    if done:
        sc = ax.scatter(
            [points[i]["disk_bytes"] / 2**20 for i in done],
            [points[i]["ppl"] for i in done],
            c=[points[i]["tokens_per_s"] for i in done],
            cmap="viridis",
            s=40,
            zorder=3,
        )
        fig.colorbar(sc, ax=ax, label="tokens/s (batch 1)")
    f = sorted(front, key=lambda i: points[i]["disk_bytes"])
    if f:
        ax.plot(
            [points[i]["disk_bytes"] / 2**20 for i in f],
            [points[i]["ppl"] for i in f],
            "r--",
            lw=1,
            label="Pareto front",
            zorder=2,
        )
    if base is not None and _values(base, DEFAULT_OBJECTIVES) is not None:
        ax.scatter([base["disk_bytes"] / 2**20], [base["ppl"]], marker="*", s=160, c="k", label="base", zorder=4)
    if winner is not None:
        w = points[winner]
        ax.scatter(
            [w["disk_bytes"] / 2**20],
            [w["ppl"]],
            s=220,
            facecolors="none",
            edgecolors="r",
            lw=2,
            label="winner",
            zorder=5,
        )
    ax.set_xlabel("bytes on disk (MiB)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("raydist sweep: quality vs. size (colour: speed)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
