"""Helpers the notebooks under ``notebooks/`` share: a workspace folder per notebook and figures shown as PNGs
(so an executed notebook shows its results without a browser or a live kernel)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

MARKER = ".aegir-notebook"


def notebook_workspace(name: str, root: str | Path | None = None) -> Path:
    """A fresh ``<root>/<name>`` folder (root: ``$NOTEBOOK_WORKDIR``, else ``./_work``). A folder left by an earlier
    run of the same notebook (it holds the marker file) is emptied first; any other existing folder is kept."""
    base = Path(root or os.environ.get("NOTEBOOK_WORKDIR") or Path.cwd() / "_work")
    work = base / name
    if (work / MARKER).is_file():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text(name)
    return work


def show_figure(figure: Any, path: Path, dpi: int = 90) -> Path:
    """Save a matplotlib ``figure`` to ``path`` (PNG), close it and display the PNG inline."""
    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    display(Image(filename=str(path)))
    return path


def save_results(results: dict, work: Path) -> Path:
    """``<work>/results.json``: the notebook's key numbers (the tests read them)."""
    path = work / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    return path
