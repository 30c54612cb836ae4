"""`mistral-edge inspect` and `mistral-edge verify`: read a bundle's manifest, check its files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..runtime.bundle import read_manifest, verify as verify_bundle

BundleArg = Annotated[Path, typer.Argument(help="bundle directory")]


def inspect(bundle: BundleArg) -> None:
    """Show a bundle's manifest as a table."""
    m = read_manifest(bundle)
    table = Table(title=f"{bundle} ({m['target']})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key in ("toolkit", "source", "window", "chunk", "graph_contract", "model", "activation_dtype"):
        value = m.get(key)
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else "-" if value is None else str(value))
    quant = m["quant"]
    table.add_row("quant", f"{quant.get('spec')} ({quant.get('format')})")
    for group, scheme in (quant.get("tensors") or {}).items():
        table.add_row(f"  {group}", scheme)
    for key, value in m["config"].items():
        table.add_row(f"config.{key}", str(value))
    for key, value in m["memory_budget"].items():
        table.add_row(f"memory.{key}", f"{value:,} B ({value / 2**20:.1f} MiB)" if isinstance(value, int) else "-")
    table.add_row("providers", ", ".join(m["runtime"].get("providers", ())) or "-")
    table.add_row("ops", ", ".join(m["ops"]) or "-")
    for f in m["files"]:
        table.add_row(f"file {f['path']}", f"{f['bytes']:,} B  sha256 {f['sha256'][:16]}…")
    Console().print(table)


def verify(bundle: BundleArg) -> None:
    """Re-hash every file and check the graph against the manifest; exit 1 on any problem."""
    problems = verify_bundle(bundle)
    for p in problems:
        typer.secho(f"FAIL {p}", fg="red", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"OK {bundle}: every file matches the manifest")

