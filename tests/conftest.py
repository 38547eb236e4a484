"""Test-wide settings.

NOTE: with OpenMP's default active waiting, torch's parallel regions stall badly when the cores are
shared with other processes (a 2-core CI machine running the suite): passive waiting keeps the tests
fast there. It must be set before torch is imported, which is why it lives here.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
