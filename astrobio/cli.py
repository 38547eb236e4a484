"""Shared command-line plumbing: expected errors become one clear line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from astrobio.train.checkpoint import CheckpointError

EXPECTED_ERRORS = (CheckpointError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
                   ImportError)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
