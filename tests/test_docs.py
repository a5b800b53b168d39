"""The docs cannot drift from the code: the architecture diagram equals the .mmd file, every module it names
exists, and every command in docs/ runs."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

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


# ---- every command in the docs runs ------------------------------------------------------------------------------
# Each doc's ```bash and ```python blocks run in order as one `bash -euo pipefail` script (python blocks through
# `python -`) in a fresh folder (with the checkout's bench/) whose ../shared/data is the real shared data, with `aegir` on PATH and the default
# settings (stores under ./data of that folder). Blocks that cannot run here (cluster set-up, credentials,
# installs that `make` already performs) are written as ```text.

RUNNABLE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>bash|python)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
DOC_FILES = sorted(p for p in DOCS.rglob("*.md"))


def doc_script(path: Path) -> str:
    """The runnable blocks of one doc as a bash script (python blocks as heredocs), in document order."""
    parts = []
    for block in RUNNABLE.finditer(path.read_text()):
        indent = block["indent"]
        body = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in block["body"].splitlines(keepends=True))
        parts.append(body if block["lang"] == "bash" else f"python - <<'AEGIR_PY'\n{body}AEGIR_PY\n")
    return "".join(parts)


def doc_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEGIR_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(WANDB_MODE="offline", WANDB_API_KEY="", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return env


def test_the_doc_block_parser_finds_indented_blocks_and_skips_text(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```bash\necho one\n```\n1. step\n   ```bash\n   echo two\n   ```\n```text\necho no\n```\n"
                   "```python\nprint(3)\n```\n")
    assert doc_script(doc) == "echo one\necho two\npython - <<'AEGIR_PY'\nprint(3)\nAEGIR_PY\n"


@pytest.mark.parametrize("doc", [p for p in DOC_FILES if doc_script(p)], ids=lambda p: str(p.relative_to(DOCS)))
def test_every_command_in_the_doc_runs(doc, tmp_path):
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "bench").symlink_to(DOCS.parent / "bench", target_is_directory=True)  # `python bench/…` as in a checkout
    script = work / "doc.sh"
    script.write_text(doc_script(doc))
    result = subprocess.run(["bash", "-euo", "pipefail", str(script)], cwd=work, env=doc_environment(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (f"{doc.name}: a command failed (exit {result.returncode})\n"
                                    f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}")


def test_the_data_foundation_doc_names_every_training_data_column_and_metadata_field():
    from aegir.store.lance_io import METADATA_TYPE, PROVENANCE_TYPE, TRAINING_DATA_SCHEMA

    text = (DOCS / "data_foundation_lance.md").read_text()
    named = set(re.findall(r"`([a-z0-9_]+)`", text))
    fields = set(TRAINING_DATA_SCHEMA.names) | {f.name for f in METADATA_TYPE} | {f.name for f in PROVENANCE_TYPE}
    assert fields - named == set()
