"""The Triton kernels. Their source is the repository-root folder kernels/, which setup.py installs as
this package (``package_dir``).

adamw8bit: the 8-bit AdamW step as the op ``astrobio::adamw8bit_step_triton``, imported on demand by
astrobio.ops for the backend "triton", so that importing astrobio never imports triton.

NOTE: kernels/ has no __init__.py on purpose. With one, Python started from the repository root would
take kernels/ for a top-level package ``kernels`` and shadow the installed ``kernels`` distribution
(which transformers imports); without one it is at most a namespace portion, and any installed package
of that name wins. This file serves a source checkout (an editable install), whose finder does not
serve a ``package_dir`` package without __init__.py: the path below leads to the modules. A regular
install copies kernels/*.py into astrobio/kernels/ without this file, and needs none.
"""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))
