"""`svdiff` command line: the commands of `commands.py` and the web app's `svdiff ui`. Errors a user can cause end
in one `error: …` line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import sys

from . import commands
from .errors import Interrupted, SvdiffError
from .ui import add_parser as add_ui


def build_parser() -> argparse.ArgumentParser:
    return commands.build_parser(more=add_ui)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum
    except SvdiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written, a disk that is full: the user's to fix
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
