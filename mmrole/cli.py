"""The ``mmrole`` command line. Each area registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that provide ``register(subparsers)``; each adds one top-level command group.
COMMAND_MODULES = (
    "mmrole.data.cli",  # mmrole data validate|prepare|demo
    "mmrole.models.cli",  # mmrole model tiny|merge
    "mmrole.eval.cli",  # mmrole eval report
    "mmrole.config_cli",  # mmrole config show
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmrole", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # area not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
