"""``python -m astrobio.train``: train with the flags given (no flags: the default job)."""

import os

# NOTE: with OpenMP's default spin-waiting, every parallel region of torch waits for a descheduled thread
# when the cores are busy with other work: a 26-step tiny run took 92 s instead of 11 s on two busy
# cores. Passive waiting costs little on idle cores. It must be set before torch loads; a value in the
# environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from astrobio.train.entry import main  # noqa: E402  (after the environment is set)

raise SystemExit(main())
