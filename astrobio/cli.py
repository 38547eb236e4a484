"""Shared command-line plumbing: expected errors become one clear line on stderr and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from astrobio.data.sources import AuthError, SourceError
from astrobio.train.checkpoint import CheckpointError

# their messages are written for the user (source errors name the source with its secrets redacted)
EXPECTED_ERRORS = (CheckpointError, SourceError, AuthError, ValueError, FileNotFoundError, NotADirectoryError,
                   PermissionError, ImportError)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except EXPECTED_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def resolve_device(name: str) -> torch.device:
    """``--device`` of every command: ``auto`` is cuda when a GPU is visible, else cpu; cuda without a
    GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}, but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)
