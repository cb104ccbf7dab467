"""The library does not import its command line: ``falip.cli`` is only loaded by ``falip.cli`` itself."""

import pkgutil
import subprocess
import sys

import falip


def library_modules() -> list[str]:
    """Every module of the package except ``falip.cli*`` and ``falip.__main__`` (which runs the CLI)."""
    names = [m.name for m in pkgutil.walk_packages(falip.__path__, prefix="falip.")]
    return sorted(n for n in names if not n.startswith("falip.cli") and n != "falip.__main__")


def test_library_modules_do_not_import_the_cli():
    modules = library_modules()
    assert {"falip.tasks.rec", "falip.tasks.classify", "falip.tasks.pointcloud", "falip.demo", "falip.results"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "cli = sorted(m for m in sys.modules if m == 'falip.cli' or m.startswith('falip.cli.'))\n"
        "print(','.join(cli))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"library modules imported the CLI: {out.stdout.strip()}"


def test_python_m_falip_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "falip", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for command in ("score", "rec", "classify", "pointcloud", "heads", "attention", "demo", "bias", "synth", "aggregate"):
        assert command in out.stdout
