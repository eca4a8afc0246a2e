"""What every benchmark records about itself: which code it measured and the command that ran it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """The git commit, whether tracked files had uncommitted changes, and the exact command line."""
    argv = sys.argv if argv is None else argv

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True).stdout.strip()

    env = " ".join(f"{k}={os.environ[k]}" for k in ("RAY_TMPDIR",) if k in os.environ)
    command = " ".join([".venv/bin/python", os.path.relpath(os.path.abspath(argv[0]), REPO), *argv[1:]])
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": f"{env} {command}".strip(),
    }


def provenance_line(p: dict[str, Any]) -> str:
    """One markdown sentence naming the code and command behind a section's figures."""
    dirty = " with uncommitted changes" if p["git_dirty"] else ""
    return f"Code measured: commit `{p['git_commit'][:12]}`{dirty}; command: `{p['command']}`."
