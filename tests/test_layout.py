"""Package layout: the library does not import its command line (``falip.cli`` is only loaded by
``falip.cli`` itself), and only ``falip.runtimes`` knows the CLIP implementations and their model objects."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

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
    for command in (
        "score",
        "rec",
        "classify",
        "pointcloud",
        "heads",
        "attention",
        "demo",
        "bias",
        "synth",
        "aggregate",
        "models",
    ):
        assert command in out.stdout


# ----------------------------------------------------------------------------------------------
# The runtime boundary: only falip.runtimes knows the CLIP implementations and their model objects.

FOREIGN = ("open_clip", "transformers", "timm")
# Data tables that happen to ship inside those packages (no model code): ImageNet class names and
# OpenAI's prompt templates.
DATA_MODULES = ("open_clip.zero_shot_metadata", "timm.data")
# What a runtime holds of its model, which nothing outside falip.runtimes may read.
MODEL_ATTRIBUTES = ("clip", "visual", "blocks", "tokenizer", "logit_scale", "logit_bias", "text_projection")


def outside_runtimes() -> list[Path]:
    root = Path(falip.__file__).parent
    return sorted(p for p in root.rglob("*.py") if "runtimes" not in p.relative_to(root).parts)


def boundary_violations(source: str) -> list[str]:
    """Imports of open_clip / transformers / timm (other than their data tables) and reads of a runtime's
    model object (``<…runtime>.clip``, ``.visual``, ``.blocks``, ``.tokenizer``, ``.logit_scale`` …) in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            names = []
        found += [f"line {node.lineno} imports {n}" for n in names if n.split(".")[0] in FOREIGN and n not in DATA_MODULES]
        if isinstance(node, ast.Attribute) and node.attr in MODEL_ATTRIBUTES:
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", "")
            if owner in ("runtime", "rt") or owner.endswith("_runtime"):
                found.append(f"line {node.lineno} reads {owner}.{node.attr}")
    return found


def test_only_runtimes_know_the_clip_implementations_and_their_model_objects():
    paths = outside_runtimes()
    assert len(paths) > 30
    offenders = {p.name: v for p in paths if (v := boundary_violations(p.read_text(encoding="utf-8")))}
    assert not offenders, offenders


def test_the_boundary_scan_flags_imports_and_model_reads():
    source = (
        "import open_clip\nfrom transformers import CLIPModel\nimport timm.models\n"
        "from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES\n"
        "def f(model, runtime):\n    return model.runtime.clip.logit_scale, runtime.tokenizer, model.runtime.logits\n"
    )
    assert sorted(boundary_violations(source)) == [
        "line 1 imports open_clip",
        "line 2 imports transformers",
        "line 3 imports timm.models",
        "line 6 reads runtime.clip",
        "line 6 reads runtime.tokenizer",
    ]
