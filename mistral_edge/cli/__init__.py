"""Typer command-line interface: thin entry points over the library."""
