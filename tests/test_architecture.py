"""The repository's layout: the root folder kernels/ shadows no installed package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(code: str, pythonpath: Path) -> str:
    """Runs ``code`` in a fresh interpreter started in the repository root, as ``python -c`` from there
    does (the current directory first on sys.path), with ``pythonpath`` before the site-packages."""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(pythonpath),
                            "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_an_installed_kernels_package_wins_over_the_root_folder(tmp_path):
    stand_in = tmp_path / "kernels"
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("STAND_IN = True\n")
    found = run_from_root("import kernels; print(getattr(kernels, 'STAND_IN', False), kernels.__file__)", tmp_path)
    assert found == f"True {stand_in / '__init__.py'}"


def test_the_triton_kernels_stay_importable_as_astrobio_kernels(tmp_path):
    code = "import importlib.util as u; print(u.find_spec('astrobio.kernels.adamw8bit').origin)"
    assert run_from_root(code, tmp_path) == str(ROOT / "kernels" / "adamw8bit.py")
    elsewhere = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
    assert elsewhere.stdout.strip() == str(ROOT / "kernels" / "adamw8bit.py"), elsewhere.stderr
