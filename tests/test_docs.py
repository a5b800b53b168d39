"""The architecture doc cannot drift from the code: its diagram equals the .mmd file and every module it names exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_architecture_diagram_matches_the_mmd_file():
    text = (DOCS / "architecture.md").read_text()
    block = re.search(r"```mermaid\n(.*?)```", text, re.S).group(1)
    assert block == (DOCS / "arch_mermaid_diagram.mmd").read_text()


def test_every_dataflow_module_named_in_the_architecture_exists():
    text = (DOCS / "architecture.md").read_text()
    table = text[text.index("## Stages"):]
    names = set(re.findall(r"`([a-z_]+)`", table)) - {"raw_", "quarantine", "predicted_pv", "training_data"}
    for name in sorted(names):
        importlib.import_module(f"aegir.dataflows.{name}")
    assert {"label_import", "region_inference", "backfill", "validation"} <= names
