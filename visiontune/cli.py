"""The ``visiontune`` command line.

Every subcommand takes ``--params params.yaml`` and any number of ``--set section.key=value`` overrides,
which map onto :class:`visiontune.config.PipelineConfig` (``visiontune config`` lists every setting).
Stage subcommands are thin: they load the config and call one library function.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

from visiontune.config import ConfigError, PipelineConfig, describe, load_params, to_yaml


def _stage(module: str, func: str) -> Callable[[PipelineConfig], object]:
    """Import lazily: `visiontune --help` must not pay for importing torch, MLflow and Prefect."""

    def call(cfg: PipelineConfig) -> object:
        import importlib

        return getattr(importlib.import_module(module), func)(cfg)

    return call


# name -> (help, callable(cfg)). The data stages and the model stages are the same functions that
# dvc.yaml and the Prefect tasks call.
STAGES: dict[str, tuple[str, Callable[[PipelineConfig], object]]] = {
    "demo-data": ("write the bundled handwriting demo data under data.raw_dir", _stage("visiontune.data.demo", "demo_stage")),
    "validate": ("validate raw data with Great Expectations; quarantine bad records", _stage("visiontune.data.validate", "validate_stage")),
    "normalize": ("resize valid images into the configured pixel range (content-addressed)", _stage("visiontune.data.normalize", "normalize_stage")),
    "convert": ("turn normalized records into a conversation dataset with a stable split", _stage("visiontune.data.convert", "convert_stage")),
    "train": ("LoRA-train the model on the conversation dataset (resumes from checkpoints)", _stage("visiontune.pipeline.train", "train_stage")),
    "evaluate": ("evaluate base and fine-tuned model on the held-out split", _stage("visiontune.pipeline.evaluate", "evaluate_stage")),
    "register": ("log the model to MLflow and promote it if it beats the champion", _stage("visiontune.pipeline.register", "register_stage")),
    "tiny-model": ("build the tiny offline random-weight model named by model.name_or_path", _stage("visiontune.testing", "tiny_model_stage")),
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.max_steps=20 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visiontune", description="Fine-tune vision-language models as a pipeline.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("run", help="run the whole pipeline as a Prefect flow: validate -> ... -> register")
    _add_common(p)
    for name, (help_, _) in STAGES.items():
        _add_common(sub.add_parser(name, help=help_))
    p = sub.add_parser("serve", help="serve the retraining flow on a cron schedule (needs a Prefect server)")
    _add_common(p)
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * 1" (Mondays 03:00)')
    p.add_argument("--name", default="visiontune-retrain", help="deployment name")
    p = sub.add_parser("config", help="list every setting with its default and meaning, or write a params file")
    p.add_argument("--write", metavar="PATH", help="write the defaults as a params file")
    _add_common(p)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        if args.command == "config" and args.write:
            with open(args.write, "w") as fh:
                fh.write(to_yaml(PipelineConfig()))
            print(f"wrote defaults to {args.write}")
            return 0
        if args.command == "config":
            print(describe())
            return 0
        cfg = load_params(args.params, args.overrides)
    except ConfigError as e:
        print(f"visiontune: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "run":
            from visiontune.flows.retrain import retrain_flow

            result = retrain_flow(params=args.params, overrides=args.overrides)
        elif args.command == "serve":
            from visiontune.flows.retrain import serve

            result = serve(cron=args.cron, name=args.name, params=args.params, overrides=args.overrides)
        else:
            result = STAGES[args.command][1](cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"visiontune {args.command}: {e}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
