"""The ``featureviz`` command line.

Each subcommand lives in its own module with ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Modules import torch, onnx and grpc inside their functions, never at import time,
so ``featureviz --help`` is instant and the client-only commands work without the server extra.
Errors a user can cause (:class:`featureviz.errors.FeaturevizError`) end the command with one line on
stderr and exit status 1 (2 for usage errors), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

# name of the module under featureviz.cli, in the order of `featureviz --help`
_COMMANDS = ["inspect", "render", "demo", "serve", "models", "jobs"]


def build_parser() -> argparse.ArgumentParser:
    from featureviz import __version__

    parser = argparse.ArgumentParser(prog="featureviz", description="Feature visualization by optimization.")
    parser.add_argument("--version", action="version", version=f"featureviz {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"featureviz.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"featureviz.cli.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from featureviz.errors import FeaturevizError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FeaturevizError as err:
        print(f"featureviz {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"featureviz {args.command}: interrupted", file=sys.stderr)
        return 130
