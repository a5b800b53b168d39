"""`aegir search …`: vector search over chip and tile-window embeddings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from aegir.cli import render
from aegir.cli.common import console, fail, settings_of
from aegir.store import ducklake

search_app = typer.Typer(help="Vector search over chip embeddings (LanceDB chip_embeddings).", no_args_is_help=True)


@search_app.command("similar")
def search_similar(
    ctx: typer.Context,
    chip: Annotated[Optional[str], typer.Option(help="uuid of a training chip to search from.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="An image file to search from (embedded with the model's checkpoint).")] = None,
    where: Annotated[Optional[list[str]], typer.Option(help="Pre-filter key=value (dataset, sample_id, s2_token_l10/l13/l17, uuid, acquired_from, acquired_to); repeatable.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Number of neighbours.")] = 10,
    uri: Annotated[Optional[str], typer.Option(help="LanceDB training table location (the embeddings live beside it).")] = None,
    table: Annotated[str, typer.Option(help="Embeddings table.")] = "chip_embeddings",
    model: Annotated[Optional[str], typer.Option(help="Model id of the vectors (needed when several models are stored).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="With --image: checkpoint to embed it (default: the one recorded).")] = None,
    include_self: Annotated[bool, typer.Option("--include-self", help="Keep the query chip in the results.")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="Exact search (bypass the ANN index).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The k chips nearest to a chip or an image (cosine distance), optionally pre-filtered."""
    from aegir.pipelines import embeddings

    try:
        result = embeddings.similar_chips(settings_of(ctx), chip, str(image) if image else None, where, k, uri,
                                          table, model, str(checkpoint) if checkpoint else None, include_self, exact)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result))
        return
    console.print(render.chip_neighbours_table(result))


@search_app.command("tiles")
def search_tiles(
    ctx: typer.Context,
    image: Annotated[Path, typer.Option(help="An image file to search from.")],
    checkpoint: Annotated[Path, typer.Option(help="The checkpoint the tiles were embedded with.")],
    tiles: Annotated[Path, typer.Option(help="The region's tile folder (as given to `aegir infer embed-tiles`).")],
    k: Annotated[int, typer.Option("-k", "--k", help="Number of windows.")] = 10,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The k region windows nearest to an image (cosine distance), with their tile, offsets and S2 cell."""
    from aegir.pipelines import embeddings

    try:
        result = embeddings.similar_tiles(settings_of(ctx), checkpoint, tiles, image, k, device)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(result))
        return
    console.print(render.tile_neighbours_table(result))
