"""``python -m astrobio.train``: train with the flags given (no flags: the default job)."""

from astrobio.train.trainer import main

raise SystemExit(main())
