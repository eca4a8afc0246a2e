"""Which code each ``benchmarks/results/*.json`` measured, and whether that code has changed since.

    .venv/bin/python scripts/bench/provenance.py                         # print the table
    .venv/bin/python scripts/bench/provenance.py --update-benchmarks-md  # write it into BENCHMARKS.md

Every results file records the commit it measured (``provenance.git_commit``, see ``_common.provenance``;
``finetune.json`` one per part, since its parts can be rerun separately). ``MEASURES`` says which repository
paths each file's figures depend on. A file is

* "current" when no commit after the recorded one touches those paths,
* "stale: N later commits touch <paths>" otherwise (``git log <commit>..HEAD -- <paths>``). The paths include
  the names their files had when they were renamed after the recorded commit, and a pure move counts as a change:
  after the package reshape (``raydist/components`` and ``raydist/stages`` moved into core/ train/ distill/
  compress/ sweep/) the code the figures measured exists only in another shape, so they are flagged. A commit
  that changes only comments or docstrings of Python files (their AST without docstrings is unchanged) does not
  count: it cannot change a figure,
* "from a dirty tree" when the run had uncommitted changes to tracked files (the commit is then only close),
* "no provenance recorded" when the file predates provenance (no commit recorded).

The table goes into the "Provenance of these figures" section at the top of BENCHMARKS.md (after the title).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (scripts/bench is not a package)
    BENCHMARKS_MD,
    REPO,
    RESULTS_DIR,
    git,
    machine_line,
    machine_of,
    md_table,
    measured_at_of,
    provenance_of,
    replace_section,
)

SECTION = "## Provenance of these figures"
# The code each results file measures (repository paths, files or directories).
MEASURES: dict[str, list[str]] = {
    "finetune.json": ["raydist/train"],
    "distill.json": ["raydist/distill", "raydist/train"],
    "distill-warmstart.json": ["raydist/distill", "raydist/train"],  # a side run of distill.py (--results-name)
    "distill_gpu.json": ["raydist/distill", "raydist/train"],
    "serve.json": ["raydist/serve", "raydist/compress/quant", "raydist/core"],
    # generation_speed (the tokens/s of every row) moved from core/evaluation.py to sweep/speed.py
    "compress.json": ["raydist/compress", "raydist/core/evaluation.py", "raydist/sweep/speed.py"],
    "compress_gpu.json": ["raydist/compress", "raydist/core/evaluation.py", "raydist/sweep/speed.py"],
    "sweep.json": ["raydist/sweep", "raydist/compress"],
    "pipeline.json": ["raydist"],
    # fine-tune and distillation loops, quantized artifacts and the serving engine's decode loop, on one GPU
    "gpu.json": [
        "raydist/train",
        "raydist/distill",
        "raydist/core",
        "raydist/compress/quant",
        "raydist/serve/engine.py",
        "raydist/serve/fast_llama.py",
        "raydist/sweep/speed.py",
    ],
}
FINETUNE_PARTS = ("overhead", "lora", "peer")


def measurements(name: str, data: dict[str, Any]) -> list[dict[str, Any]]:
    """The separately measured parts of one results file: ``{label, provenance, measured_at, machine}`` each."""
    if name != "finetune.json":
        prov = provenance_of(data)
        return [{"label": name, "provenance": prov, "measured_at": measured_at_of(data), "machine": machine_of(data)}]
    # finetune.json: each part keeps the figures of the run that last measured it.
    parts = data.get("part_provenance") or {}
    last_run = set(data.get("script_parts_run") or [])
    out = []
    for part in FINETUNE_PARTS:
        if f"{part}_measured_at" not in data:
            continue
        prov = parts.get(part) or (provenance_of(data) if part in last_run else None)
        out.append(
            {
                "label": f"{name} ({part})",
                "provenance": prov if prov and prov.get("git_commit") else None,
                "measured_at": data[f"{part}_measured_at"],
                "machine": (prov or {}).get("machine") or (machine_of(data) if part in last_run else None),
            }
        )
    return out


def renamed_from(commit: str, paths: list[str]) -> list[str]:
    """The earlier names of files now under ``paths`` that were renamed after ``commit`` (chains followed)."""
    log = git("log", "-M", "--diff-filter=R", "--name-status", "--format=", f"{commit}..HEAD") or ""
    renames = [ln.split("\t")[1:3] for ln in log.splitlines() if ln.startswith("R") and ln.count("\t") == 2]
    watched, found = list(paths), []
    changed = True
    while changed:
        changed = False
        for old, new in renames:
            if old not in watched and any(new == p or new.startswith(p.rstrip("/") + "/") for p in watched):
                watched.append(old)
                found.append(old)
                changed = True
    return found


def code_of(source: Optional[str]) -> Optional[str]:
    """A Python source's AST without docstrings (comments are not in it): what the code does, not what it says."""
    if source is None:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def changes_code(commit: str, paths: list[str]) -> bool:
    """Whether ``commit`` changes what the files under ``paths`` do. Only an in-place edit of a Python file that
    leaves its AST without docstrings unchanged does not count; any other change (non-Python files, renames, added
    or deleted files, strings that are not docstrings) does."""
    out = git("diff-tree", "--no-commit-id", "-r", "-M", "--name-status", commit, "--", *paths) or ""
    for line in out.splitlines():
        kind, *names = line.split("\t")
        if kind != "M" or not names[0].endswith(".py"):
            return True
        before = code_of(git("show", f"{commit}^:{names[0]}"))
        if before is None or before != code_of(git("show", f"{commit}:{names[0]}")):
            return True
    return False


def later_commits(commit: str, paths: list[str]) -> tuple[list[str], list[str]]:
    """(the commits after ``commit`` that change the code under ``paths`` or their earlier names, the paths they
    touch); commits that change only comments or docstrings there are left out (``changes_code``)."""
    commits: list[str] = []
    touched = []
    for p in paths:
        names = [p, *renamed_from(commit, [p])]
        hashes = (git("log", "--format=%h", f"{commit}..HEAD", "--", *names) or "").split()
        hashes = [h for h in hashes if changes_code(h, names)]
        if hashes:
            touched.append(p)
            commits += [h for h in hashes if h not in commits]
    return commits, touched


def status(prov: Optional[dict[str, Any]], paths: list[str]) -> str:
    if not prov:
        return "no provenance recorded"
    commit = prov["git_commit"]
    if git("cat-file", "-e", f"{commit}^{{commit}}") is None:
        return f"recorded commit {commit[:12]} is not in this repository"
    parts = []
    if not paths:
        parts.append("code measured unknown (not in MEASURES)")
    else:
        commits, touched = later_commits(commit, paths)
        if commits:
            n = len(commits)
            parts.append(
                f"stale: {n} later commit{'s' if n != 1 else ''} touch{'' if n != 1 else 'es'} "
                + ", ".join(f"`{t}`" for t in touched)
            )
    if prov.get("git_dirty"):
        parts.append("from a dirty tree")
    elif prov.get("git_dirty") is None:
        parts.append("dirty tree unknown")
    return "; ".join(parts) or "current"


def rows(results_dir: Path = RESULTS_DIR) -> list[tuple[str, ...]]:
    out = []
    for f in sorted(results_dir.glob("*.json")):
        data = json.loads(f.read_text())
        for m in measurements(f.name, data):
            p = m["provenance"]
            out.append(
                (
                    f"`{m['label']}`",
                    f"`{p['git_commit'][:12]}`" if p else "-",
                    "-" if not p or p.get("git_dirty") is None else ("yes" if p["git_dirty"] else "no"),
                    m["measured_at"] or "-",
                    machine_line(m["machine"]) if m["machine"] else "not recorded",
                    status(p, MEASURES.get(f.name, [])),
                )
            )
    return out


def section(results_dir: Path = RESULTS_DIR) -> str:
    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    files = sorted(p.name for p in results_dir.glob("*.json"))
    lines = [
        SECTION,
        "",
        "Every section below is written by its script from `benchmarks/results/<name>.json` (`--markdown-only` "
        "rewrites a script's section from its file without measuring; `bash scripts/bench/all.sh` reruns the CPU "
        "benchmarks, then this table). This table is written by `.venv/bin/python scripts/bench/provenance.py "
        f"--update-benchmarks-md`, here at HEAD `{head}`: the commit each file records and whether later commits "
        "touch the code its figures measured (`git log <commit>..HEAD -- <paths>`, the paths below; files renamed "
        "since count under their old names too, and a pure move counts as a change: figures measured before the "
        "package reshape are flagged; a commit that changes only comments or docstrings does not count).",
        "",
        *md_table(("results file", "commit", "dirty", "measured_at", "machine", "status"), rows(results_dir)),
        "",
        "Code each file measures: "
        + "; ".join(f"`{f}`: " + ", ".join(f"`{p}`" for p in MEASURES.get(f, ["?"])) for f in files)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--update-benchmarks-md",
        action="store_true",
        help=f"write the table into the '{SECTION[3:]}' section at the top of BENCHMARKS.md (else print it)",
    )
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the results files are")
    args = ap.parse_args()
    text = section(args.results_dir)
    if args.update_benchmarks_md:
        replace_section(text, at_top=True)
        print(f"wrote the '{SECTION[3:]}' section of {BENCHMARKS_MD.relative_to(REPO)}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
