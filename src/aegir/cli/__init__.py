"""The ``aegir`` command line: parses arguments, calls a pipeline or store function, prints. No logic here.

This module is the map of commands: each group lives in its own module (``labels``, ``imagery``, ``dataset``,
``masks``, ``training``, ``region``, ``plan``, ``search``, ``flywheel``, ``tools``), tables and report lines in
``render``, and the shared consoles / settings / error exit in ``common``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aegir.cli import dataset, flywheel, imagery, labels, masks, plan, region, search, tools, training
from aegir.cli.common import fail
from aegir.config import ConfigError, load_settings

app = typer.Typer(help="Ægir Eider's Lightning Lance: PV segmentation data flywheel.", no_args_is_help=True)


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(help="TOML settings file (else $AEGIR_CONFIG).")] = None,
) -> None:
    """Settings come from AEGIR_* environment variables and an optional TOML file."""
    from aegir.store.lance_io import use_object_store_settings

    try:
        ctx.obj = {"settings": load_settings(config)}
    except ConfigError as exc:
        fail(str(exc))
    use_object_store_settings(ctx.obj["settings"])  # LanceDB reaches the same S3 endpoint as the lakehouse


app.add_typer(labels.labels_app, name="labels")
app.add_typer(labels.prompts_app, name="prompts")
app.add_typer(labels.lake_app, name="lake")
app.add_typer(imagery.imagery_app, name="imagery")
app.add_typer(dataset.dataset_app, name="dataset")
app.add_typer(masks.masks_app, name="masks")
app.command("train")(training.train)
app.command("predict")(training.predict)
app.command("evaluate")(training.evaluate)
app.add_typer(training.yolo_app, name="yolo")
app.add_typer(region.infer_app, name="infer")
app.add_typer(plan.plan_app, name="plan")
app.command("flywheel")(flywheel.flywheel)
app.command("quicklook")(flywheel.quicklook)
app.command("browse")(tools.browse)
app.command("dag")(tools.dag)
app.command("config")(tools.show_config)
app.add_typer(search.search_app, name="search")
