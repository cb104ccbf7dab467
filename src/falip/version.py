"""falip's version: the one place it is written (pyproject.toml reads it; results JSON records it)."""

__version__ = "0.1.0"


def install_command(extra: str) -> str:
    """The pip command that adds ``extra`` to falip as it is installed here: ``pip install -e '<checkout>[extra]'``
    for an editable install from a checkout, else ``pip install 'falip[extra]'`` (a wheel or sdist)."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:
        direct = json.loads(metadata.distribution("falip").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        direct = {}
    if direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file://"):
        return f"pip install -e '{unquote(urlparse(direct['url']).path)}[{extra}]'"
    return f"pip install 'falip[{extra}]'"
