"""The one base error of the store layer, shared by the lakehouse and the Lance stores (which never import each
other): callers catch :class:`StoreError` for any store that cannot be opened, read or written as asked."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A store (the DuckLake lakehouse, a Lance table) cannot be opened, read or written as asked."""


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """A library's message on one line (GDAL, pandas and lance messages may span several), cut at ``limit``
    characters when given (lance's IO errors run to pages)."""
    text = " ".join(str(exc).split())
    return text if limit is None or len(text) <= limit else text[:limit] + " …"
