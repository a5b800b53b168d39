"""`aegir browse`, `aegir dag`, `aegir config`: the local web page, the DAG picture, the settings in effect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from aegir import pipelines
from aegir.cli.common import console, fail, settings_of
from aegir.store import ducklake


def browse(
    ctx: typer.Context,
    uri: Annotated[Optional[str], typer.Option(help="training_data table location (default: under the LanceDB root).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; any other address needs --allow-remote).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8765,
    version: Annotated[Optional[int], typer.Option(help="Table version the page opens at (default: latest).")] = None,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Serve on a non-loopback --host; requests then need a token: $AEGIR_BROWSE_TOKEN, or one generated and printed in the URL.")] = False,
) -> None:
    """Serve a local web page over training_data: a map of chip footprints and a filterable thumbnail grid."""
    from aegir.browse import make_server, serve

    try:
        server = make_server(uri, settings_of(ctx).lancedb_root, host, port, version, log_requests=True,
                             allow_remote=allow_remote)
    except (OSError, ValueError, ducklake.StoreError) as exc:
        fail(str(exc))
    serve(server, lambda url: console.print(f"aegir browse: serving {url}  (Ctrl-C stops)", highlight=False))
    console.print("stopped", highlight=False)


def dag(out: Annotated[Path, typer.Option(help="Image to write (.png, .svg, .pdf).")] = Path("dag.png")) -> None:
    """Write a picture of the Hamilton DAG of every stage (needs graphviz)."""
    try:
        path = pipelines.write_dag_image(out)
    except RuntimeError as exc:
        fail(str(exc))
    console.print(f"wrote {path}")


def show_config(ctx: typer.Context) -> None:
    """Print the settings in effect."""
    print(json.dumps({k: str(v) for k, v in vars(settings_of(ctx)).items()}, indent=2))
