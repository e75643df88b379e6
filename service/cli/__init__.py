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
_COMMANDS = ["inspect", "render", "evaluate", "exemplars", "atlas", "demo", "serve", "health", "models", "datasets",
             "jobs"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


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


# Packages of the `server` extra: a command that needs one of them in a client-only install says which extra to
# install (and, where there is one, the remote alternative) instead of ending in a traceback.
_SERVER_EXTRA = frozenset({"torch", "torchvision", "triton", "numpy", "PIL", "onnx", "onnx2torch", "onnxruntime",
                           "onnxsim", "onnxscript", "grpc_health", "grpc_reflection", "prometheus_client"})
_NEEDS_SERVER_EXTRA = {
    "render": "local rendering needs the server extra: pip install 'featureviz[server]', or pass --server ADDR "
              "to render on a featureviz server",
    "inspect": "inspecting a model needs the server extra: pip install 'featureviz[server]', or upload it to a "
               "featureviz server (featureviz models upload FILE --server ADDR; featureviz models layers SHA256)",
    "evaluate": "evaluating class visualizations needs the server extra: pip install 'featureviz[server]'",
    "serve": "the server needs the server extra: pip install 'featureviz[server]'",
    "health": "the health check needs grpcio-health-checking: pip install 'featureviz[server]'",
    "exemplars": "dataset examples need the server extra: pip install 'featureviz[server]'",
    "atlas": "an atlas without --server runs an embedded server, which needs the server extra: pip install "
             "'featureviz[server]', or pass --server ADDR",
    "demo": "the local demo needs the server and demo extras: pip install 'featureviz[server,demo]', or pass "
            "--server ADDR to render on a featureviz server",
}


def _dash_positionals(parser: argparse.ArgumentParser, tokens: list[str]) -> list[str]:
    """Let positionals start with ``-`` (a negated objective: ``-LAYER:5``, ``-'conv1/Relu:pre':5``).

    argparse takes any token that starts with ``-`` for an option, and everything after ``--`` for a positional,
    options included. Here a token is an option only when it names one of ``parser``'s options (or an
    abbreviation of exactly one, as argparse allows); an option's values are taken as they come; ``--`` marks the
    next token as a positional. The result puts the options first and the positionals after a ``--``.
    """
    options, positionals = [], []
    strings = parser._option_string_actions
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name = token.split("=", 1)[0]
        matches = [s for s in strings if s == name] or [s for s in strings if s.startswith(name) and
                                                        name.startswith("--") and len(name) > 2]
        if token == "--":
            positionals.extend(tokens[i + 1:i + 2])
            i += 2
        elif token.startswith("-") and len(token) > 1 and len(matches) == 1:
            action = strings[matches[0]]
            takes = 0 if "=" in token or action.nargs == 0 else 1 if action.nargs in (None, "?") else 0
            if action.nargs == "?" and (i + 1 >= len(tokens) or tokens[i + 1].startswith("-")):
                takes = 0
            options.extend(tokens[i:i + 1 + takes])
            i += 1 + takes
        else:
            positionals.append(token)
            i += 1
    return [*options, "--", *positionals] if positionals else options


def main(argv: list[str] | None = None) -> int:
    from featureviz.errors import FeaturevizError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _subparsers(parser)
    at = next((i for i, token in enumerate(argv) if not token.startswith("-")), None)
    if at is not None and argv[at] in commands and getattr(commands[argv[at]], "dash_positionals", False):
        argv[at + 1:] = _dash_positionals(commands[argv[at]], argv[at + 1:])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FeaturevizError as err:
        print(f"featureviz {args.command}: error: {err}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:
        root = (err.name or "").split(".")[0]
        if root not in _SERVER_EXTRA or args.command not in _NEEDS_SERVER_EXTRA:
            raise
        print(f"featureviz {args.command}: error: {_NEEDS_SERVER_EXTRA[args.command]} (missing module {root!r})",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"featureviz {args.command}: interrupted", file=sys.stderr)
        return 130
