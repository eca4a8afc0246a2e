"""The measurement scaffolding every benchmark shares, in one place.

* ``provenance()``   — what every ``benchmarks/results/*.json`` records about itself: the git commit, whether
  tracked files had uncommitted changes, the exact command line, when, the machine (``machine()``: CPU model,
  cores, memory, the x86 ISA extensions that change results, the GPU) and the library versions.
* ``CpuSampler``     — CPU seconds of every process on the box, sorted into the benchmark's own processes
  (training ranks, Ray daemons and actors, ...) and "foreign" ones (other people's jobs), sampled in a
  background thread: on a shared box this says how contended each measured interval was.
* markdown helpers   — ``provenance_line`` / ``machine_line`` / ``versions_line`` (one sentence each),
  ``md_table`` and ``replace_section`` (rewrite one ``## Section`` of BENCHMARKS.md in place).

``psutil`` gives cores, memory, load averages and CPU times; ``/proc/cpuinfo`` is read only for what psutil does
not give (the CPU's model name and its flags), and ``/proc/<pid>/task/<tid>/comm`` only for thread names.
``scripts/bench`` is not a package: the scripts put this directory on ``sys.path`` and ``import _common``.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results"
BENCHMARKS_MD = REPO / "BENCHMARKS.md"

# x86 ISA extensions that change CPU results (int8 GEMM kernels, bf16/int8 tiles): recorded when present.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
# Libraries whose version every result records (those that are importable; see ``versions``).
VERSION_PACKAGES = ("torch", "ray", "transformers", "deepspeed", "peft")
# Environment variables that are part of the command line when set (they change what runs where).
COMMAND_ENV = ("RAY_TMPDIR", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- provenance


def git(*cmd: str) -> Optional[str]:
    """``git <cmd>`` in the repository; None when git or the repository is not there."""
    try:
        out = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The exact command that ran, relative to the repository root: ``[ENV=..] <python> <script> <args>``."""
    argv = list(sys.argv if argv is None else argv)
    python = sys.executable or "python"
    if os.path.abspath(python).startswith(str(REPO) + os.sep):
        python = os.path.relpath(os.path.abspath(python), REPO)
    script = os.path.relpath(os.path.abspath(argv[0]), REPO) if argv else ""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in COMMAND_ENV if k in os.environ]
    return " ".join([*env, python, shlex.join([script, *argv[1:]])])


def _is_results_path(path: str) -> bool:
    return path == "BENCHMARKS.md" or path.startswith("benchmarks/results/")


def provenance(argv: Optional[Sequence[str]] = None, extra_versions: Sequence[str] = ()) -> dict[str, Any]:
    """What a results file records about the run that wrote it; take it when the run starts (the code that is
    measured is the code at the start).

    ``git_commit`` / ``git_dirty``: HEAD and whether tracked files other than results (``benchmarks/results/``,
    ``BENCHMARKS.md``: what benchmarks run before this one wrote) had uncommitted changes; ``git_dirty_paths``
    lists every uncommitted tracked path. On a machine that
    got a copy of the tree without ``.git`` (the GPU machines), set ``BENCH_GIT_COMMIT`` (and ``BENCH_GIT_DIRTY``
    = 1/0) to the values of the checkout the copy came from; otherwise both are None (unknown provenance).
    ``command``: ``command_line(argv)``. ``measured_at``: local time now. ``machine``: ``machine()``.
    ``versions``: ``versions(extra_versions)``.
    """
    commit = git("rev-parse", "HEAD")
    dirty_paths: Optional[list[str]] = None
    if commit:
        status = git("diff", "--name-only", "HEAD")  # tracked files with uncommitted changes, staged or not
        # Results files and BENCHMARKS.md are what benchmarks write (all.sh runs them back to back), not code.
        dirty_paths = None if status is None else [ln.strip() for ln in status.splitlines() if ln.strip()]
        code = None if dirty_paths is None else [x for x in dirty_paths if not _is_results_path(x)]
        dirty: Optional[bool] = None if code is None else bool(code)
    else:
        commit = os.environ.get("BENCH_GIT_COMMIT") or None
        flag = os.environ.get("BENCH_GIT_DIRTY")
        dirty = None if flag is None else flag.strip().lower() not in ("", "0", "false", "no")
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "git_dirty_paths": dirty_paths,
        "command": command_line(argv),
        "measured_at": time.strftime(TIME_FORMAT),
        "machine": machine(),
        "versions": versions(extra_versions),
    }


def _cpuinfo_field(name: str) -> Optional[str]:
    """The first ``name : value`` of /proc/cpuinfo (psutil gives neither the model name nor the flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_isa() -> list[str]:
    """Which of ``ISA_FLAGS`` this CPU has (empty off x86 Linux)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in ISA_FLAGS if f in flags]


def gpu_name() -> Optional[str]:
    """The first CUDA device's name, when torch is importable and sees one (torch is imported here, lazily)."""
    try:
        import torch
    except ImportError:
        return None
    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA setup is "no GPU" for the record
        return None


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU model and ISA flags, cores, memory, GPU, OS."""
    import psutil

    try:
        usable = len(psutil.Process().cpu_affinity())
    except (AttributeError, OSError):
        usable = None
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "isa": cpu_isa(),
        "cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": usable,
        "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu_name(),
        "os": platform.platform(),
    }


def versions(extra: Sequence[str] = ()) -> dict[str, Optional[str]]:
    """``python`` and the installed version of each importable package of ``VERSION_PACKAGES`` (found without
    importing them). Packages named in ``extra`` are always recorded, None when not installed."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for pkg in (*VERSION_PACKAGES, *extra):
        try:
            found = importlib.util.find_spec(pkg) is not None
        except (ImportError, ValueError):
            found = False
        try:
            out[pkg] = version(pkg) if found else None
        except PackageNotFoundError:
            out[pkg] = None
        if out[pkg] is None and pkg not in extra:
            del out[pkg]
    return out


def loadavg() -> float:
    """The box's 1-minute load average (it is shared: every phase records how busy it was)."""
    import psutil

    return round(psutil.getloadavg()[0], 2)


# ----------------------------------------------------------------------------------------------- reading results


def provenance_of(r: dict[str, Any]) -> Optional[dict[str, Any]]:
    """A results file's recorded provenance, or None (files written before the scripts recorded it)."""
    p = r.get("provenance")
    return p if isinstance(p, dict) and p.get("git_commit") else None


def machine_of(r: dict[str, Any]) -> Any:
    """The machine a results file records: ``provenance.machine``, else what older files kept at the top level
    (a dict or a sentence), else the device a GPU result names; None when it records none."""
    p = r.get("provenance") or {}
    if p.get("machine"):
        return p["machine"]
    if r.get("machine"):
        return r["machine"]
    if r.get("device"):
        return {"gpu": r["device"]} if r["device"] != "cpu" else None
    return None


def versions_of(r: dict[str, Any]) -> dict[str, Optional[str]]:
    """The library versions a results file records (``provenance.versions``, else the older places)."""
    p = r.get("provenance") or {}
    if p.get("versions"):
        return p["versions"]
    m = r.get("machine") if isinstance(r.get("machine"), dict) else {}
    out: dict[str, Optional[str]] = {}
    if m.get("python"):
        out["python"] = m["python"]
    out.update(m.get("versions") or {})
    for pkg in ("torch", "torchao"):
        if m.get(pkg):
            out.setdefault(pkg, m[pkg])
    out.update({k: v for k, v in (r.get("versions") or {}).items() if k not in out})
    return out


def measured_at_of(r: dict[str, Any]) -> Optional[str]:
    return (r.get("provenance") or {}).get("measured_at") or r.get("measured_at")


# ----------------------------------------------------------------------------------------------- markdown


def provenance_line(p: Optional[dict[str, Any]], with_command: bool = True) -> str:
    """One markdown sentence naming the code (and the command) behind a section's figures."""
    if not p or not p.get("git_commit"):
        return "Code measured: not recorded (these figures predate provenance in the results file)."
    dirty = {True: " with uncommitted changes", None: " (uncommitted changes unknown)"}.get(p.get("git_dirty"), "")
    command = f"; command: `{p['command']}`" if with_command and p.get("command") else ""
    return f"Code measured: commit `{p['git_commit'][:12]}`{dirty}{command}."


def machine_line(m: Any) -> str:
    """The one way a machine is written: ``2-core AMD EPYC (avx2), 23.5 GiB, no GPU``."""
    if m is None:
        return "not recorded"
    if isinstance(m, str):
        return m
    cpu = m.get("cpu") or m.get("processor") or ""
    cores = m.get("cores") or m.get("cpus")
    parts = []
    if cpu or cores:
        isa = f" ({', '.join(m['isa'])})" if m.get("isa") else ""
        parts.append((f"{cores}-core " if cores else "") + (cpu or "CPU") + isa)
    if m.get("mem_gib"):
        parts.append(f"{m['mem_gib']:g} GiB")
    parts.append(m.get("gpu") or "no GPU")
    return ", ".join(parts)


def versions_line(v: dict[str, Optional[str]]) -> str:
    """``python 3.11.7, torch 2.13.0+cpu, ...`` (a package recorded as None reads "not installed")."""
    return ", ".join(f"{k} {x or 'not installed'}" for k, x in v.items())


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """A markdown table as lines. ``align`` has one letter per column: ``l`` (default) or ``r``."""
    align = align.ljust(len(header), "l")

    def line(cells: Iterable[Any]) -> str:
        cells = ["" if c is None else str(c) for c in cells]
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    return [line(header), "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|", *map(line, rows)]


def fmt_sci(x: float) -> str:
    """A learning rate as people write it: 1e-4, 2e-5, 3e-4 (else ``:g``)."""
    mantissa, _, exp = f"{x:.0e}".partition("e")
    return f"{mantissa}e{int(exp)}" if float(f"{mantissa}e{exp}") == x and abs(x) < 1e-3 else f"{x:g}"


def _section_bounds(lines: list[str], heading: str, prefix: bool = False) -> Optional[tuple[int, int]]:
    """``[start, end)`` of the ``heading`` section (the first heading that starts with ``heading``, with
    ``prefix``): up to the next ``## `` heading outside a code fence."""
    start = next(
        (i for i, ln in enumerate(lines) if (ln.startswith(heading) if prefix else ln.rstrip() == heading)), None
    )
    if start is None:
        return None
    fenced = False
    for i in range(start + 1, len(lines)):
        if lines[i].startswith("```"):
            fenced = not fenced
        elif not fenced and lines[i].startswith("## "):
            return start, i
    return start, len(lines)


def replace_section(
    section: str, path: Path = BENCHMARKS_MD, at_top: bool = False, heading_prefix: Optional[str] = None
) -> None:
    """Rewrite the section whose heading is ``section``'s first line (``## ...``) in ``path``, up to the next
    ``## `` heading; when it is not there, add it at the end (``at_top``: before the first section, i.e. after
    the title and any intro). ``heading_prefix``: the old section is the first whose heading starts with it
    (for headings that carry a figure, e.g. the GPU's name). The file is re-read right before writing: another
    benchmark may have rewritten its own section meanwhile. Sections are separated by exactly one blank line."""
    new = section.rstrip("\n").splitlines()
    heading = new[0].rstrip()
    if not heading.startswith("## "):
        raise ValueError(f"a section starts with a '## ' heading, not {heading!r}")
    lines = (path.read_text() if path.is_file() else "# Benchmarks\n").rstrip("\n").splitlines()
    bounds = _section_bounds(lines, heading_prefix or heading, prefix=heading_prefix is not None)
    if bounds is None:
        first = next((i for i, ln in enumerate(lines) if ln.startswith("## ")), len(lines))
        bounds = (first, first) if at_top else (len(lines), len(lines))
    start, end = bounds
    head = lines[:start]
    while head and not head[-1].strip():
        head.pop()
    tail = lines[end:]
    while tail and not tail[0].strip():
        tail.pop(0)
    out = head + ([""] if head else []) + new + ([""] + tail if tail else [])
    path.write_text("\n".join(out) + "\n")


# ----------------------------------------------------------------------------------------------- CPU sampler

FOREIGN = "foreign (other jobs on the box, kernel)"
RANKS = "training ranks"
DRIVER = "bench driver (Ray Train driver / Ray Data)"


def is_rank(cmd: str) -> bool:
    """A training rank: a Ray Train worker, or a rank of the hand-written DeepSpeed loop under torchrun."""
    launcher = "torchrun" in cmd or "torch.distributed.run" in cmd
    return cmd.startswith("ray::RayTrainWorker") or ("_ds_baseline_loop.py" in cmd and not launcher)


def cpu_category(pid: int, cmd: str, ours: bool, root: int) -> str:
    """What a process is, for the CPU breakdown: the benchmark's driver, its training ranks, its Ray daemons and
    actors, its other children, or foreign (not descended from the benchmark: other jobs, the kernel)."""
    if pid == root:
        return DRIVER
    if not ours:
        return FOREIGN
    if is_rank(cmd):
        return RANKS
    if "torchrun" in cmd or "torch.distributed.run" in cmd:
        return "torchrun launcher"
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "agent"):
        if key in cmd:
            return f"Ray daemon ({key})"
    if cmd.startswith("ray::"):
        return "Ray actors/tasks (" + cmd.split()[0][5:] + ")"
    return "other children"


@dataclass
class CpuSample:
    """Cumulative CPU seconds since the sampler started, at time ``t``."""

    t: float
    procs: dict[str, float]  # by ``cpu_category``
    threads: dict[str, float]  # the training ranks' threads by name, summed over ranks
    box_busy: float  # the whole box (psutil.cpu_times: all but idle and iowait)


@dataclass
class CpuWindow:
    """CPU seconds used in ``[t0, t1]`` (``seconds`` = t1 - t0 after clamping to the sampled span)."""

    seconds: float
    procs: dict[str, float] = field(default_factory=dict)
    threads: dict[str, float] = field(default_factory=dict)
    box_busy: float = 0.0

    @property
    def own(self) -> float:
        """CPU seconds of the benchmark itself (every category but foreign)."""
        return sum(v for k, v in self.procs.items() if k != FOREIGN)

    def cores(self, category: str = FOREIGN) -> float:
        """Cores a category used on average over the window."""
        return self.procs.get(category, 0.0) / max(1e-9, self.seconds)


class CpuSampler:
    """Samples, every ``period_s`` in a background thread, the CPU time of every process on the box (psutil),
    the threads of this benchmark's training ranks, and the box's busy time.

    The box is shared, so a wall-time ratio alone cannot say *why* one side is slower, nor whether other jobs
    slowed a step down. Per-process CPU seconds sorted by ``categorize`` (default ``cpu_category``: this
    process is the root; its descendants are the benchmark's own: ranks, Ray daemons and actors, ...) can:
    ``window(t0, t1)`` gives each category's CPU seconds over any interval, interpolated between samples.
    Each sample adds every process's CPU time since the one before, so processes that start or exit do not
    jump the sums (a process first seen after the first sample counts its whole CPU time: it started since).
    """

    def __init__(
        self,
        period_s: float = 0.5,
        categorize: Callable[[int, str, bool, int], str] = cpu_category,
        thread_category: Optional[str] = RANKS,
    ):
        self.period_s = period_s
        self.categorize = categorize
        self.thread_category = thread_category
        self.root = os.getpid()
        self.samples: list[CpuSample] = []
        self._last: dict[tuple[str, int], float] = {}
        self._procs: dict[str, float] = {}
        self._threads: dict[str, float] = {}
        self._box0: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a failed sample leaves a gap, never kills the benchmark
                pass
            if self._stop.wait(self.period_s):
                try:
                    self._sample()
                except Exception:  # noqa: BLE001
                    pass
                return

    def _delta(self, key: tuple[str, int], cpu: float, first: bool) -> float:
        last = self._last.get(key)
        self._last[key] = cpu
        if last is None:
            return 0.0 if first else cpu
        return max(0.0, cpu - last)

    def _sample(self) -> None:
        import psutil

        first = not self.samples
        procs: dict[int, tuple[int, float, str]] = {}
        for p in psutil.process_iter(["ppid", "name", "cmdline", "cpu_times"]):
            info = p.info
            if info.get("cpu_times") is None:
                continue
            cmd = " ".join(info.get("cmdline") or []).strip() or (info.get("name") or "")
            procs[p.pid] = (info.get("ppid") or 0, info["cpu_times"].user + info["cpu_times"].system, cmd)
        ours = {self.root}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        todo = [self.root]
        while todo:  # this process's descendants: Ray's daemons, workers, actors, torchrun's ranks
            for c in children.get(todo.pop(), []):
                if c not in ours:
                    ours.add(c)
                    todo.append(c)
        for pid, (_, cpu, cmd) in procs.items():
            cat = self.categorize(pid, cmd, pid in ours, self.root)
            self._procs[cat] = self._procs.get(cat, 0.0) + self._delta(("p", pid), cpu, first)
            if self.thread_category is not None and cat == self.thread_category:
                self._sample_threads(pid, first)
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        busy += getattr(t, "steal", 0.0)
        if self._box0 is None:
            self._box0 = busy
        self.samples.append(CpuSample(time.time(), dict(self._procs), dict(self._threads), busy - self._box0))

    def _sample_threads(self, pid: int, first: bool) -> None:
        import psutil

        try:
            threads = psutil.Process(pid).threads()
        except (psutil.Error, OSError):
            return
        for th in threads:
            try:  # psutil gives thread CPU times but not their names
                comm = Path(f"/proc/{pid}/task/{th.id}/comm").read_text().strip()
            except OSError:
                comm = "?"
            name = "main thread" if th.id == pid else f"thread {comm}"
            used = self._delta(("t", th.id), th.user_time + th.system_time, first)
            self._threads[name] = self._threads.get(name, 0.0) + used

    def _at(self, t: float) -> Optional[CpuSample]:
        """The cumulative sample at ``t``, interpolated linearly (None outside the sampled span)."""
        import bisect

        times = [s.t for s in self.samples]
        i = bisect.bisect_left(times, t)
        if not self.samples or t < times[0] or t > times[-1]:
            return None
        if times[i] == t:
            return self.samples[i]
        a, b = self.samples[i - 1], self.samples[i]
        w = (t - a.t) / (b.t - a.t) if b.t > a.t else 0.0

        def mix(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
            return {k: x.get(k, 0.0) + w * (y.get(k, 0.0) - x.get(k, 0.0)) for k in {*x, *y}}

        return CpuSample(
            t, mix(a.procs, b.procs), mix(a.threads, b.threads), a.box_busy + w * (b.box_busy - a.box_busy)
        )

    def window(self, t0: float, t1: float, clamp: bool = True) -> Optional[CpuWindow]:
        """CPU seconds used in ``[t0, t1]``, by category (largest first). ``clamp``: cut the window to the
        sampled span; else None when the samples do not cover it. None when there are under 2 samples."""
        if len(self.samples) < 2:
            return None
        if clamp:
            t0 = min(max(t0, self.samples[0].t), self.samples[-1].t)
            t1 = min(max(t1, self.samples[0].t), self.samples[-1].t)
        a, b = self._at(t0), self._at(t1)
        if a is None or b is None or t1 < t0:
            return None

        def diff(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
            d = {k: y.get(k, 0.0) - x.get(k, 0.0) for k in {*x, *y}}
            return dict(sorted(((k, v) for k, v in d.items() if v > 0), key=lambda kv: -kv[1]))

        return CpuWindow(t1 - t0, diff(a.procs, b.procs), diff(a.threads, b.threads), b.box_busy - a.box_busy)
