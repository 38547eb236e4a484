"""The trainer: ``python -m astrobio.train`` (see docs/TRAINING.md).

Imports are lazy so that ``python -m astrobio.train`` can set up the process (``__main__``) before
torch loads.
"""

import importlib

_EXPORTS = {"ConfigError": "astrobio.train.config", "TrainConfig": "astrobio.train.config",
            "parse_config": "astrobio.train.config", "main": "astrobio.train.entry",
            "run": "astrobio.train.entry"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'astrobio.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
