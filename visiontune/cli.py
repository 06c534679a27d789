"""The ``visiontune`` command line.

Every subcommand takes ``--params params.yaml`` and any number of ``--set section.key=value`` overrides,
which map onto :class:`visiontune.config.PipelineConfig` (``visiontune config`` lists every setting).
The stage subcommands come from the stage registry (:mod:`visiontune.stages`): each loads the config
and calls its stage's function, the same one ``dvc.yaml`` and the Prefect tasks call.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from visiontune import _quiet, stages
from visiontune.config import ConfigError, PipelineConfig, describe, load_params, to_yaml


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting, e.g. --set train.max_steps=20 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visiontune", description="Fine-tune vision-language models as a pipeline.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    order = " -> ".join(s.name for s in stages.pipeline())
    _add_common(sub.add_parser("run", help=f"run the whole pipeline as a Prefect flow: {order}"))
    for stage in stages.STAGES:
        _add_common(sub.add_parser(stage.name, help=stage.help))
    sub.choices["report"].add_argument("--run", metavar="RUN_ID", help="rebuild the report of any past MLflow run "
                                       "from MLflow alone (into report.output_dir/runs/RUN_ID/)")
    p = sub.add_parser("serve", help="serve the retraining flow on a cron schedule (needs a Prefect server)")
    _add_common(p)
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * 1" (Mondays 03:00)')
    p.add_argument("--name", default="visiontune-retrain", help="deployment name")
    p = sub.add_parser("deploy", help="deploy the retraining flow on a cron schedule to a Prefect process work pool "
                       "(needs a Prefect server; a worker runs the flow: prefect worker start --pool POOL)")
    _add_common(p)
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * 1" (Mondays 03:00)')
    p.add_argument("--pool", required=True, help="process work pool (created when missing)")
    p.add_argument("--name", default="visiontune-retrain", help="deployment name")
    p.add_argument("--working-dir", help="folder the runs execute in (default: the current one)")
    p = sub.add_parser("config", help="list every setting with its default and meaning, or write a params file")
    p.add_argument("--write", metavar="PATH", help="write the defaults as a params file")
    _add_common(p)
    p = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage registry (or --check that it is current)")
    p.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml differs from the registry")
    return parser


def _dvc_yaml(check: bool) -> int:
    path = stages.REPO_ROOT / "dvc.yaml"
    if check:
        current = path.read_text() if path.exists() else ""
        if current != stages.dvc_yaml():
            print(f"{path} is out of date with visiontune/stages.py: run `visiontune dvc-yaml`", file=sys.stderr)
            return 1
        print(f"{path} matches the stage registry")
        return 0
    print(f"wrote {stages.write_dvc_yaml(path)}")
    return 0


def _run(args: argparse.Namespace, cfg: PipelineConfig) -> object:
    if args.command == "run":
        from visiontune.flows.retrain import retrain_flow

        return retrain_flow(params=args.params, overrides=args.overrides)
    if args.command == "serve":
        from visiontune.flows.retrain import serve

        return serve(cron=args.cron, name=args.name, params=args.params, overrides=args.overrides)
    if args.command == "deploy":
        from visiontune.flows.retrain import deploy

        return deploy(cron=args.cron, pool=args.pool, name=args.name, params=args.params, overrides=args.overrides,
                      working_dir=args.working_dir)
    if args.command == "report" and args.run:
        from visiontune.pipeline.report import report_for_run

        return report_for_run(cfg, args.run)
    return stages.get(args.command).function()(cfg)


def _one_line(error: Exception) -> str:
    """An error's message on one line (libraries' messages, e.g. transformers' loading errors, span several)."""
    return " ".join(str(error).split())


def main(argv: Optional[list[str]] = None) -> int:
    _quiet.install()  # known-benign third-party messages off, before any library loads (visiontune/_quiet.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    if args.command == "dvc-yaml":
        return _dvc_yaml(args.check)
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
        print(f"visiontune: configuration error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        result = _run(args, cfg)
    except (ConfigError, OSError, ValueError) as e:
        print(f"visiontune {args.command}: {_one_line(e)}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
