"""`mistral-edge inspect` and `mistral-edge verify`: read a bundle's manifest, check its files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..contract import attention_note
from ..runtime.bundle import read_manifest, verify as verify_bundle

BundleArg = Annotated[Path, typer.Argument(help="bundle directory")]


def inspect(bundle: BundleArg) -> None:
    """Show a bundle's manifest as a table."""
    m = read_manifest(bundle)
    rows = [(key, json.dumps(dataclasses.asdict(getattr(m, key)))) for key in ("toolkit", "source")]
    rows += [(key, "-" if getattr(m, key) is None else str(getattr(m, key)))
             for key in ("window", "sinks", "pool", "chunk", "graph_contract", "model", "activation_dtype", "kv_cache")]
    trained, cache = attention_note(m.config.sliding_window, m.window, m.sinks, m.pool)
    rows += [("trained with", trained), ("attention", cache)]
    rows.append(("quant", f"{m.quant.spec} ({m.quant.format})"))
    rows += [(f"  {group}", scheme) for group, scheme in m.quant.tensors.items()]
    rows += [(f"config.{key}", str(value)) for key, value in m.config.to_dict().items()]
    rows += [(f"memory.{key}", "-" if value is None else f"{value:,} B ({value / 2**20:.1f} MiB)")
             for key, value in dataclasses.asdict(m.memory_budget).items()]
    rows.append(("providers", ", ".join(m.runtime.providers) or "-"))
    rows.append(("ops", ", ".join(m.ops) or "-"))
    rows += [(f"file {f.path}", f"{f.bytes:,} B  sha256 {f.sha256[:16]}…") for f in m.files]
    rows.append(("manifest_sha256", m.manifest_sha256 + (" (edited since export)" if m.edited else "")))
    table = Table(title=Text(f"{bundle} ({m.target})"), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(Text(key), Text(value))  # Text: a manifest's strings are data, not rich markup
    Console().print(table)


def verify(bundle: BundleArg) -> None:
    """Re-hash every file and check the manifest and graph; exit 1 on any problem."""
    problems = verify_bundle(bundle)
    for p in problems:
        typer.secho(f"FAIL {p}", fg="red", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"OK {bundle}: every file matches the manifest (manifest_sha256 {read_manifest(bundle).manifest_sha256})")

