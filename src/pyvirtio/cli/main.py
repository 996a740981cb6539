"""``pyvirtio`` command line: a thin argparse layer over the library.

Each sub-command lives in its own module exposing ``register(subparsers)`` (which adds
its parser and sets ``func``). Bad arguments and :class:`ConfigurationError` give a
one-line error and exit status 2; Ctrl-C stops cleanly with status 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pyvirtio.errors import ConfigurationError, VirtioError

#: sub-command modules, each with ``register(subparsers) -> None``
COMMANDS = ("demo", "serve", "probe")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="pyvirtio",
        description="VIRTIO 1.x devices and drivers in Python (both sides of every layer).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"pyvirtio.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"pyvirtio.cli.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyvirtio`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ConfigurationError as e:
        print(f"pyvirtio: error: {e}", file=sys.stderr)
        return 2
    except (VirtioError, OSError) as e:
        print(f"pyvirtio: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
