"""``python -m aegir`` runs the CLI."""

from aegir.cli import app

app(prog_name="aegir")
