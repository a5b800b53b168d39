"""What every command shares: the two consoles, the settings of the invocation, the one-line error exit."""

from __future__ import annotations

import typer
from rich.console import Console

from aegir.config import Settings
from aegir.store import ducklake

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def settings_of(ctx: typer.Context) -> Settings:
    """The :class:`Settings` loaded by the ``aegir`` callback for this invocation."""
    return ctx.obj["settings"]


def fail(message: str) -> None:
    """Print ``error: message`` on stderr (one line, no traceback) and exit with status 1."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def label_query(datasets, bbox, s2_cell, date_from, date_to, limit) -> ducklake.LabelQuery:
    """A :class:`ducklake.LabelQuery` from the CLI's filter options; a malformed ``--bbox`` exits with its text."""
    box = None
    if bbox:
        try:
            box = tuple(float(v) for v in bbox.split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            fail(f"--bbox {bbox!r} must be min_lon,min_lat,max_lon,max_lat")
    return ducklake.LabelQuery(tuple(datasets or ()), box, s2_cell=s2_cell, date_from=date_from, date_to=date_to,
                               limit=limit)
