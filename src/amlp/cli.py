"""The ``amlp`` command: a thin shell over the library."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="amlp: attentive MLPs and the efficient attentions they are measured against.",
                  no_args_is_help=True, add_completion=False)
console = Console(width=None if sys.stdout.isatty() else 160)


def _flag(value: bool) -> str:
    return "yes" if value else "-"


@app.command("list")
def list_command() -> None:
    """Print every registered mixer and its capabilities."""
    from .layers import list_mixers

    table = Table(title="registered mixers")
    for col in ("name", "causal", "non-causal", "cross", "padding", "step", "max length", "description"):
        table.add_column(col)
    for info in list_mixers():
        c = info.capabilities
        max_len = str(c.max_length) if c.max_length else "-"
        if c.max_length_option:
            max_len = f"{max_len if c.max_length else 'set'} by option {c.max_length_option}"
        table.add_row(info.name, _flag(c.causal), _flag(c.noncausal), _flag(c.cross), _flag(c.padding),
                      _flag(c.recurrent), max_len, info.description)
    console.print(table)


@app.command("check")
def check_command(names: list[str] = typer.Argument(None, help="mixers to check (default: all)")) -> None:
    """Compare each mixer's fast path with its plain reference (float64, with padding)."""
    from .layers import list_mixers
    from .layers.check import check_mixer

    names = names or [info.name for info in list_mixers()]
    table = Table(title="fast path vs reference (float64)")
    for col in ("mixer", "result", "max abs error", "message"):
        table.add_column(col)
    failed = 0
    for name in names:
        res = check_mixer(name)
        failed += not res.passed
        table.add_row(name, "[green]pass[/]" if res.passed else "[red]FAIL[/]", f"{res.max_abs_error:.2e}", res.message)
    console.print(table)
    if failed:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
