"""``raybm <command> --config FILE [key=value ...]``: the command line, thin wrappers over
the stages (the commands themselves are in ``raybm.commands``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from raybm import __version__
from raybm.commands import browse, models, stages
from raybm.errors import RaybmError


def _versions() -> str:
    """raybm's version and those of the libraries it runs on."""
    found = []
    for dist in ("ray", "torch", "transformers", "onnxruntime", "streamlit"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    return f"raybm {__version__} ({', '.join(found)}; Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    """The ``raybm`` argument parser: every command with its arguments."""
    parser = argparse.ArgumentParser(prog="raybm", description="Fine-tune pretrained transformers on Ray.")
    parser.add_argument(
        "--version",
        action="version",
        version=_versions(),
        help="raybm's version and those of the libraries it runs on (for bug reports)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (stages, models, browse):
        commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``raybm`` command; a raybm error is one line on stderr and exit status 2."""
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
