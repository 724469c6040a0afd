"""``raybm <stage> --config FILE [key=value ...]``: thin wrappers over the stages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from raybm.config import JobConfig, describe, load_config
from raybm.errors import RaybmError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML job config (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.lr=3e-5 data.max_length=64")


def _cmd_data(args: argparse.Namespace) -> int:
    from raybm.data import format_report, run_data_stage
    from raybm.data.sources import resolve_source
    from raybm.runtime import ensure_ray

    cfg = load_config(args.config, args.overrides)
    source = resolve_source(cfg.data, cfg.storage)  # bad paths and columns fail before Ray starts
    where = ensure_ray(cfg.ray)
    print(f"raybm data: running on {where}", flush=True)
    prepared = run_data_stage(cfg, force=args.force, source=source)
    print()
    print(format_report(prepared.report))
    print(f"\nPrepared dataset: {prepared.path}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.describe:
        for key, default, doc in describe(JobConfig):
            print(f"{key} = {default}\n    {doc}")
        return 0
    cfg = load_config(args.config, args.overrides)
    print(cfg.to_yaml(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raybm", description="Fine-tune pretrained transformers on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="clean, de-duplicate, split and report a dataset")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if the dataset is already prepared")
    p.set_defaults(func=_cmd_data)
    p = sub.add_parser("config", help="print the resolved config, or every key with --describe")
    _add_config_args(p)
    p.add_argument("--describe", action="store_true", help="list every config key, its default and meaning")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RaybmError as e:
        print(f"raybm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raybm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
