"""Command line: ``python -m gid_core make-dataset | train | distill | evaluate --config FILE``.

``FILE`` is YAML (``.yaml``/``.yml``) or JSON holding the pydantic model of the command
(``SyntheticDatasetConfig``, ``JobConfig`` or ``EvalConfig``); relative paths in it are relative to
the working directory. Exit codes: 0 success, 2 bad command line / config / dataset (every
problem is printed with its field path), 3 training ended cancelled, 1 anything else.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .config import EvalConfig, JobConfig, SyntheticDatasetConfig, load_config_file
from .errors import ConfigFileError, ProblemsError

EXIT_USAGE = 2
EXIT_CANCELLED = 3


def format_validation_error(error: ValidationError, source: Path) -> str:
    lines = [f"invalid config file {source}: {error.error_count()} problem(s)"]
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def parse_model(model: type[BaseModel], data: dict[str, Any], source: Path) -> Any:
    """``model`` from a config file's ``data``; ``ConfigFileError`` lists every invalid field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigFileError(source, format_validation_error(e, source)) from None


def cli_hooks(rank: int, desc: str) -> list:
    from .hooks import TqdmProgressHook

    return [TqdmProgressHook(desc=desc)]


def _print_result(result: dict[str, Any]) -> None:
    from .evaluation import summarize_metrics

    metrics = {k: v for k, v in result.get("metrics", {}).items() if k != "summary"}
    if result.get("metrics"):
        print(summarize_metrics(result["metrics"]), file=sys.stderr)
    print(json.dumps({**result, "metrics": metrics}, indent=2, default=str))


def cmd_make_dataset(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic_dataset

    data = load_config_file(args.config)
    if args.output_dir is not None:
        data["output_dir"] = str(args.output_dir)
    cfg = parse_model(SyntheticDatasetConfig, data, args.config)
    print(json.dumps(make_synthetic_dataset(cfg), indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import check_job_inputs, run_job_launched

    data = load_config_file(args.config)
    kind = data.setdefault("kind", args.command)
    if kind != args.command:
        raise ConfigFileError(args.config, f"config file {args.config}: kind: the config says {kind!r} "
                                           f"but the command is {args.command!r}")
    if args.devices is not None:
        data["devices"] = args.devices
    job: JobConfig = parse_model(JobConfig, data, args.config)
    if job.devices > 1:  # in the parent, so errors are not buried in a child's traceback
        check_job_inputs(job)
    hooks = functools.partial(cli_hooks, desc=args.command) if not args.no_progress else None
    result = run_job_launched(job, args.output_dir, hooks, resume=args.resume)
    _print_result(result)
    return 0 if result["status"] == "completed" else EXIT_CANCELLED


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .engine import check_eval_inputs, run_evaluation_launched
    from .fileio import write_json_atomic
    from .jobdir import JobDir

    data = load_config_file(args.config)
    if args.devices is not None:
        data["devices"] = args.devices
    cfg: EvalConfig = parse_model(EvalConfig, data, args.config)
    if cfg.devices > 1:  # the checks each rank makes, reported once
        check_eval_inputs(cfg)
    metrics = run_evaluation_launched(cfg)
    if args.output_dir is not None:
        write_json_atomic(JobDir(args.output_dir).metrics, metrics)  # creates the folder
    _print_result({"metrics": metrics})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gid_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    specs = {
        "make-dataset": ("write the synthetic COCO-format dataset", cmd_make_dataset),
        "train": ("train a detector on ground truth", cmd_train),
        "distill": ("distil a student from a trained teacher (GID)", cmd_train),
        "evaluate": ("COCO bbox metrics of a model on a dataset", cmd_evaluate),
    }
    for name, (help_text, fn) in specs.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(fn=fn)
        p.add_argument("--config", type=Path, required=True, help="YAML or JSON config file")
        needs_out = name in ("train", "distill")
        p.add_argument("--output-dir", type=Path, required=needs_out, default=None,
                       help="job folder (checkpoints, export, metrics.json)" if needs_out
                       else "overrides the config's output folder / where metrics.json goes")
        if name != "make-dataset":
            p.add_argument("--devices", type=int, default=None, help="DDP processes (overrides the config)")
        if needs_out:
            p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                           help="continue from the output folder's last checkpoint (default: yes)")
            p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (ConfigFileError, ProblemsError) as e:  # bad config file, dataset or setup
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
