"""The pipeline: `raydist pipeline`, finetune → distill → sweep → serve from one spec, read top to bottom.

Driver (``run_pipeline``):
1. plan: every stage's run directory and artifact location are known from the spec alone
   (``<run.output_dir>/<run.name>/artifact``), so references (``@finetune`` ...) resolve before anything runs;
   a stage whose artifact (with ``raydist.json``) is already there is *finished* and will be skipped — if
   its run was made with the same config (``run`` / ``job`` aside), else the pipeline is refused;
2. check every stage before Ray starts (``preflight_pipeline``, all `raydist validate` does for a
   pipeline): a stage whose model is another stage's artifact that does not exist yet is checked against a
   stand-in (the model that artifact is made from, when its shape is the same) or without its model;
3. start (or join) one Ray and call each stage's own driver in order (``run_finetune``, ``run_distill``,
   ``run_sweep``, ``run_serve``), in this process; an interrupted stage is resumed by its driver (same run
   directory, same config); ``lineage.json`` is rewritten after every stage;
4. print a summary table (quality, size, speed, wall time per stage); with a serve stage, block until
   Ctrl-C / SIGTERM like `raydist serve` (or return after deploying: ``serve_blocking=False``).

Pipeline directory (``<output_dir>/<name>``, a local path or a URI):
  lineage.json     the spec, and per stage: status, resolved config, artifact, metrics, wall time
  finetune/  distill/  sweep/     the stages' run directories (unless a section names another run.output_dir)

~500 lines: the pipeline driver read top to bottom (plan, preflight of every stage, run, resume).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from raydist.config.base import ModelConfig
from raydist.config.loading import config_from_dict
from raydist.config.pipeline import (
    PRODUCERS,
    PipelineConfig,
    is_reference,
    join_location,
    references,
)
from raydist.core import storage
from raydist.core.artifact import read_manifest
from raydist.core.preflight import PreflightError, preflight, preflight_distill, read_data
from raydist.core.runs import RunDirError, config_differences, init_ray, with_absolute_paths
from raydist.core.runs import run_location as location_of
from raydist.distill.distill import run_distill
from raydist.serve.app import resolve_api_key, run_serve
from raydist.serve.loading import ArtifactError, check_artifact
from raydist.sweep.sweep import preflight_sweep, run_sweep
from raydist.train.finetune import run_finetune

LINEAGE = "lineage.json"
ARTIFACT_DIR = "artifact"  # the artifact directory inside every training / sweep stage's run directory
CONFIG_FILE = "config.yaml"  # what a stage's run directory records of its config (stages.common.open_run_dir)

# Statuses in lineage.json.
DONE, SKIPPED, STOPPED, FAILED, INTERRUPTED, PENDING = (
    "done",
    "skipped-finished",
    "stopped",
    "failed",
    "interrupted",
    "pending",
)


# ----------------------------------------------------------------------------------------------- storage


def read_text(location: str) -> Optional[str]:
    """The text at a local path or URI, or None when there is no file there."""
    return storage.read_text(location) if storage.is_file(location) else None


def write_json(location: str, data: Any) -> None:
    """Write JSON atomically (a local file is renamed into place; an object store's single PUT is atomic)."""
    storage.write_text(location, json.dumps(data, indent=2, default=str) + "\n")


def read_manifest_at(artifact: str) -> Optional[dict[str, Any]]:
    """The artifact's ``raydist.json`` (local path or URI), or None when it is not a finished artifact."""
    try:
        return read_manifest(artifact)
    except FileNotFoundError:
        return None


def run_location(stage_cfg) -> str:
    """Where a stage's run directory is, exactly as its driver puts it (local paths made absolute)."""

    return str(location_of(stage_cfg))


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class PipelinePlan:
    """What the spec alone says about a (re)run: locations, references resolved, finished stages."""

    artifacts: dict[str, str]  # producer stage -> its artifact location
    run_dirs: dict[str, str]  # producer stage -> its run directory
    configs: dict[str, Any]  # stage -> its config with references replaced by artifact locations
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> its artifact's manifest
    started: set[str] = field(default_factory=set)  # unfinished stages whose run directory exists (resume)


def resolve_stage(cfg: PipelineConfig, stage: str, locations: dict[str, str]):
    """``stage``'s config with each reference (``@finetune`` ...) replaced by that stage's artifact location."""
    section = getattr(cfg, stage)
    data = section.model_dump(mode="json")
    for path, ref in references(cfg, stage).items():
        node = data
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        node[last] = locations[ref[1:]]
    return config_from_dict(type(section), data, f"pipeline section {stage!r}")


def _resolved_json(stage_cfg) -> dict[str, Any]:
    """The config as the stage's driver records it (local model paths absolute)."""

    return with_absolute_paths(stage_cfg).model_dump(mode="json")


def plan_pipeline(cfg: PipelineConfig) -> PipelinePlan:
    """Resolve locations and references and find the finished stages (no Ray, no weights).

    Raises:
        RunDirError: a finished stage was made with a different config (its rerun would not be this spec).
    """

    run_dirs = {s: run_location(getattr(cfg, s)) for s in cfg.stages() if s in PRODUCERS}
    artifacts = {s: join_location(d, ARTIFACT_DIR) for s, d in run_dirs.items()}
    plan = PipelinePlan(
        artifacts=artifacts, run_dirs=run_dirs, configs={s: resolve_stage(cfg, s, artifacts) for s in cfg.stages()}
    )
    for stage, run_dir in run_dirs.items():
        recorded = read_text(join_location(run_dir, CONFIG_FILE))
        manifest = read_manifest_at(artifacts[stage])
        if manifest is None:
            if recorded is not None:
                plan.started.add(stage)  # its driver resumes it, or refuses it naming what differs
            continue
        if recorded is None:  # an artifact without its run's config: nothing to compare, but it is finished
            plan.finished[stage] = manifest
            continue
        diffs = config_differences(yaml.safe_load(recorded) or {}, _resolved_json(plan.configs[stage]))
        if diffs:
            raise RunDirError(
                f"pipeline stage {stage!r} already finished in {run_dir} with a different config "
                f"({', '.join(diffs[:8])} differ); rerun with the same spec, or give the pipeline (or "
                f"{stage}.run.name) a new name"
            )
        plan.finished[stage] = manifest
    return plan


# ----------------------------------------------------------------------------------------------- preflight


def _stand_in(cfg: PipelineConfig, plan: PipelinePlan, ref: str) -> tuple[Optional[ModelConfig], bool]:
    """A model to check a reference against: ``(model, same_shape)``.

    A finished stage's artifact is itself. ``@finetune`` not built yet is the model it is made from (same
    architecture and tokenizer). A distilled model has its pretrained student's shape; a pruned or random
    student's shape is only known once it is built, so its teacher stands in for the shape-independent checks
    (tokenizer, quantization schemes).
    """
    stage = ref[1:]
    if stage in plan.finished:
        return ModelConfig(path=plan.artifacts[stage]), True
    if stage == "finetune":
        return cfg.finetune.model, True
    if stage == "distill":
        st = cfg.distill.student
        if st.source == "pretrained":
            return (_stand_in(cfg, plan, st.path)[0] if is_reference(st.path) else ModelConfig(path=st.path)), True
        teacher = cfg.distill.teacher
        return (_stand_in(cfg, plan, teacher.path)[0] if is_reference(teacher.path) else teacher), False
    return None, False  # @sweep: a compressed artifact (only serve takes one)


def _check_data(data_cfg) -> str:

    n, formats = read_data(data_cfg)
    return f"data: {n} records; formats {formats}"


def _preflight_stage(cfg: PipelineConfig, plan: PipelinePlan, stage: str, pending: dict[str, str]) -> list[str]:
    """Checks of one stage; ``pending``: {field: reference} whose artifact does not exist yet."""

    stage_cfg = plan.configs[stage]
    if stage == "finetune":
        return preflight(stage_cfg).lines()
    if stage == "distill":
        update, notes = {}, []
        if "teacher.path" in pending:
            update["teacher"] = _stand_in(cfg, plan, pending["teacher.path"])[0]
            notes.append(f"teacher: {pending['teacher.path']} (checked as {update['teacher'].path})")
        if "student.path" in pending:  # the student is another stage's artifact: check the rest
            notes.append(f"student: {pending['student.path']} (checked when the stage starts)")
            return [_check_data(stage_cfg.data)] + [f"note: {n}" for n in notes]
        report = preflight_distill(stage_cfg.model_copy(update=update))[0]
        return report.lines() + [f"note: {n}" for n in notes]
    if stage == "sweep":
        notes = []
        if "model.path" in pending:
            ref = pending["model.path"]
            model, same_shape = _stand_in(cfg, plan, ref)
            space = stage_cfg.search_space
            if not same_shape and any(space.structured):  # depends on the shape the student will have
                space = space.model_copy(update={"structured": [0.0]})
                notes.append(
                    "structured fractions are checked when the sweep starts (the student's shape is known then)"
                )
            stage_cfg = stage_cfg.model_copy(update={"model": model, "search_space": space})
            notes.insert(0, f"model: {ref} (checked as {model.path})")
        preflight_sweep(stage_cfg)
        count = len(cfg.sweep.search_space.candidates())
        return [f"{count} distinct candidate(s)"] + [f"note: {n}" for n in notes]
    # serve

    resolve_api_key(stage_cfg)
    if "artifact" not in pending:
        return [f"artifact: {check_artifact(stage_cfg.artifact, stage_cfg.adapter)}"]
    if stage_cfg.adapter is not None and not (Path(stage_cfg.adapter).expanduser() / "adapter_config.json").is_file():
        raise ArtifactError(
            f"adapter {stage_cfg.adapter!r} holds no adapter_config.json (not a peft adapter directory)"
        )
    return [f"artifact: {pending['artifact']} (checked when the stage starts)"]


def preflight_pipeline(cfg: PipelineConfig, plan: Optional[PipelinePlan] = None) -> list[str]:
    """Check every stage before Ray starts (what `raydist validate` does for a pipeline); returns report lines.

    A reference to an artifact that exists (a finished stage) is checked like any path; one that does not
    exist yet is checked against a stand-in (``_stand_in``) or skipped, and the stage's own preflight runs
    on the real artifact when the stage starts.

    Raises:
        PreflightError / DataError / ModelSourceError / ArtifactError / ConfigError: naming stage and field.
        RunDirError: a finished stage was made with a different config.
    """
    plan = plan or plan_pipeline(cfg)
    lines = []
    for stage in cfg.stages():
        pending = {f: r for f, r in references(cfg, stage).items() if r[1:] not in plan.finished}
        if stage in plan.finished:
            lines.append(f"{stage}: finished ({plan.artifacts[stage]}); will be skipped")
            continue
        try:
            stage_lines = _preflight_stage(cfg, plan, stage, pending)
        except (ValueError, OSError) as e:
            # Every raydist check error is a ValueError (PreflightError, DataError, ModelSourceError, ...); the
            # message gets the stage's name in front, so it names the field of the pipeline spec.
            raise PreflightError(f"{stage}.{e}" if _names_field(str(e)) else f"{stage}: {e}") from e
        lines.append(f"{stage}: OK" + (" (resuming its run)" if stage in plan.started else ""))
        lines += [f"  {line}" for line in stage_lines]
    return lines


def _names_field(message: str) -> bool:
    """Whether a check's message starts with a dotted field (``data.seq_len ...``) the stage name can prefix."""
    head = message.split(" ", 1)[0].rstrip(":")
    return bool(head) and all(part.isidentifier() for part in head.split("."))


# ----------------------------------------------------------------------------------------------- run


def _cpus_needed(cfg: PipelineConfig) -> float:
    """The most CPUs any stage reserves at once: the one Ray every stage shares must hold it."""
    need = [0.0]
    for stage in cfg.stages():
        c = getattr(cfg, stage)
        if stage in ("finetune", "distill"):
            need.append(c.scaling.num_workers * c.resources.num_cpus)
        if stage == "distill" and c.kd.teacher_mode == "cache":
            need.append(c.kd.cache_actors * c.resources.num_cpus)
        if stage == "sweep":
            need.append(c.search.max_concurrent * c.resources.num_cpus)
        if stage == "serve":
            need.append((c.autoscaling.max_replicas if c.autoscaling else (c.num_replicas or 1)) * c.resources.num_cpus)
    return max(need)


def _drivers() -> dict[str, Callable]:

    return {"finetune": run_finetune, "distill": run_distill, "sweep": run_sweep}


def _artifact_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "metrics": manifest.get("metrics", {}),
        "num_parameters": manifest.get("num_parameters"),
        "bytes_on_disk": manifest.get("bytes_on_disk"),
    }


def run_pipeline(cfg: PipelineConfig, *, serve_blocking: bool = True, verbose: bool = True) -> str:
    """Run (or resume) the pipeline; return the location of its ``lineage.json``.

    Args:
        serve_blocking: with a serve stage, block until Ctrl-C / SIGTERM after deploying (as `raydist serve`),
            then delete the application; False returns right after deploying (the app keeps serving).
        verbose: print the stages' progress lines and the summary.

    Raises:
        ConfigError / PreflightError / RunDirError / ...: before Ray starts (nothing ran).
        StageFailed / NoCandidateMet / any stage's error: a stage failed (recorded in lineage.json); the
            stages before it stay finished, and rerunning the same spec resumes from there.
    """
    import ray

    say = print if verbose else (lambda *a, **k: None)
    plan = plan_pipeline(cfg)
    directory = cfg.directory if storage.is_uri(cfg.directory) else str(Path(cfg.directory).expanduser().resolve())
    lineage_at = join_location(directory, LINEAGE)
    previous = json.loads(read_text(lineage_at) or "{}").get("stages", {})
    for line in preflight_pipeline(cfg, plan):
        say(f"[raydist] pipeline check: {line}")
    lineage: dict[str, Any] = {
        "format": 1,
        "pipeline": cfg.name,
        "directory": directory,
        "started_unix": time.time(),
        "spec": cfg.model_dump(mode="json"),
        "stages": {s: {"status": PENDING} for s in cfg.stages()},
    }
    started_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")

    init_ray(_cpus_needed(cfg), metrics="serve" in cfg.stages())  # one Ray for every stage: each driver joins it
    drivers = _drivers()
    for stage in cfg.stages():
        stage_cfg = plan.configs[stage]
        entry = lineage["stages"][stage]
        entry["config"] = stage_cfg.model_dump(mode="json")
        entry["inputs"] = {
            path: {"reference": ref, "location": plan.artifacts[ref[1:]]}
            for path, ref in references(cfg, stage).items()
        }
        if stage in plan.finished:
            old = previous.get(stage, {})
            entry.update(
                status=SKIPPED,
                artifact=plan.artifacts[stage],
                run_dir=plan.run_dirs[stage],
                wall_s=old.get("wall_s") if old.get("artifact") == plan.artifacts[stage] else None,
                **_artifact_fields(plan.finished[stage]),
            )
            say(f"[raydist] pipeline: {stage} already finished ({plan.artifacts[stage]}); skipped")
            write_json(lineage_at, lineage)
            continue
        say(f"[raydist] pipeline: {stage} {'resuming' if stage in plan.started else 'starting'}")
        if stage in plan.run_dirs:
            entry.update(run_dir=plan.run_dirs[stage], resumed=stage in plan.started)
        t0 = time.time()
        entry["started_unix"] = t0
        try:
            if stage == "serve":
                url = run_serve(stage_cfg, blocking=False, verbose=verbose)
                entry.update(
                    status=DONE,
                    artifact=stage_cfg.artifact,
                    url=url,
                    app_name=stage_cfg.app_name,
                    wall_s=time.time() - t0,
                )
                write_json(lineage_at, lineage)
                continue
            location = str(drivers[stage](stage_cfg, verbose=verbose))
        except BaseException as e:
            entry.update(
                status=FAILED if isinstance(e, Exception) else INTERRUPTED,
                wall_s=time.time() - t0,
                error=f"{type(e).__name__}: {e}",
            )
            write_json(lineage_at, lineage)
            say(
                f"[raydist] pipeline: {stage} {entry['status']} after {entry['wall_s']:.0f}s; rerun the same "
                f"command to resume"
            )
            say(format_summary(lineage))
            raise
        manifest = read_manifest_at(location)
        if manifest is None:  # run.stop_after_steps: the stage checkpointed and stopped on purpose
            entry.update(status=STOPPED, wall_s=time.time() - t0)
            write_json(lineage_at, lineage)
            say(
                f"[raydist] pipeline: {stage} stopped early (run.stop_after_steps); later stages not run; "
                f"rerun the same command to resume"
            )
            say(format_summary(lineage))
            return lineage_at
        if location != plan.artifacts[stage]:  # the same place spelled differently (e.g. a URI normalised)
            plan.artifacts[stage] = location
            for later in cfg.stages()[cfg.stages().index(stage) + 1 :]:
                plan.configs[later] = resolve_stage(cfg, later, plan.artifacts)
        entry.update(status=DONE, artifact=location, wall_s=time.time() - t0, **_artifact_fields(manifest))
        write_json(lineage_at, lineage)
    lineage["finished_unix"] = time.time()
    write_json(lineage_at, lineage)
    say(format_summary(lineage))
    say(f"[raydist] lineage: {lineage_at}")
    if cfg.serve is not None and serve_blocking:
        _serve_until_stopped(cfg.serve.app_name, started_ray, say)
    return lineage_at


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve_until_stopped(app_name: str, started_ray: bool, say) -> None:
    """Block like `raydist serve`: Ctrl-C or SIGTERM deletes the application (and the Ray we started)."""
    import ray
    from ray import serve

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    say("[raydist] serving; Ctrl-C stops.")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        say("[raydist] stopping ...")
    finally:
        serve.delete(app_name)
        if started_ray:
            serve.shutdown()
            ray.shutdown()


# ----------------------------------------------------------------------------------------------- summary


def summary_rows(lineage: dict[str, Any]) -> list[dict[str, str]]:
    """One row per stage: status, quality, size, speed, wall time, artifact (strings, for the table)."""
    rows = []
    for stage, e in lineage["stages"].items():
        m = e.get("metrics") or {}
        quality = speed = size = "-"
        if stage in ("finetune", "distill") and m.get("eval_ppl") is not None:
            quality = f"eval ppl {m['eval_ppl']:.4g}"
            if m.get("eval_ppl_before") is not None:
                quality += f" (from {m['eval_ppl_before']:.4g})"
        elif stage == "sweep" and m.get("ppl") is not None:
            quality = f"ppl {m['ppl']:.4g}"
            if m.get("base_ppl") is not None:
                quality += f" (base {m['base_ppl']:.4g})"
        if e.get("bytes_on_disk") is not None:
            size = f"{e['bytes_on_disk'] / 2**20:.1f} MiB"
            if e.get("num_parameters"):
                size += f" / {_count(e['num_parameters'])} params"
        if m.get("tokens_per_s"):
            speed = f"{m['tokens_per_s']:.0f} tok/s " + ("(generate)" if stage == "sweep" else "(train)")
        wall = f"{e['wall_s']:.0f}s" if e.get("wall_s") is not None else "-"
        where = e.get("url") or e.get("artifact") or e.get("run_dir") or "-"
        if stage == "serve" and e.get("artifact"):
            where = f"{e.get('url', '-')} ({e['artifact']})"
        rows.append(
            {
                "stage": stage,
                "status": e["status"],
                "quality": quality,
                "size": size,
                "speed": speed,
                "wall": wall,
                "artifact": where,
            }
        )
    return rows


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def format_summary(lineage: dict[str, Any]) -> str:
    """The summary table printed at the end of a pipeline."""
    rows = summary_rows(lineage)
    cols = ["stage", "status", "quality", "size", "speed", "wall", "artifact"]
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    line = lambda r: "  ".join(r[c].ljust(width[c]) for c in cols).rstrip()  # noqa: E731
    header = line({c: c for c in cols})
    return "\n".join([f"[raydist] pipeline {lineage['pipeline']}:", header, "-" * len(header), *map(line, rows)])
