"""``falip models``: every model falip knows, whether it runs or why it is refused (from the adapter registry)."""

from __future__ import annotations

import json


def register(sub) -> None:
    """Add ``falip models``."""
    p = sub.add_parser("models", help="list every open_clip config and transformers model type falip knows: runs / refused: why")
    p.add_argument("--format", default="text", choices=["text", "markdown", "json"], help="markdown: the table in docs/models.md")
    p.set_defaults(func=cmd_models)


def versions() -> str:
    """The libraries the classification depends on (which configs exist, which timm towers)."""
    from ..runtimes.open_clip import library_versions

    return library_versions()


def markdown(rows: list[tuple[str, str, str]]) -> str:
    """The table of docs/models.md: the library versions, then one row per model."""
    lines = [f"With {versions()}:", "", "| adapter | model | status |", "|---|---|---|"]
    lines += [f"| {adapter} | `{name}` | {status} |" for adapter, name, status in rows]
    return "\n".join(lines)


def cmd_models(args) -> int:
    from ..runtimes.registry import catalog

    rows = catalog()
    if args.format == "json":
        print(json.dumps([dict(adapter=a, model=n, status=s) for a, n, s in rows], indent=1))
    elif args.format == "markdown":
        print(markdown(rows))
    else:
        width = max(len(n) for _, n, _ in rows)
        for adapter, name, status in rows:
            print(f"{name:<{width}}  {status}  [{adapter}]")
        runs = sum(s == "runs" for _, _, s in rows)
        print(f"{runs} of {len(rows)} run; falip.load(name) takes a name, falip.load(name, pretrained=tag or file) its weights")
    return 0
