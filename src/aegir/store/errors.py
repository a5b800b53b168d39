"""The one base error of the store layer, shared by the lakehouse and the Lance stores (which never import each
other): callers catch :class:`StoreError` for any store that cannot be opened, read or written as asked."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A store (the DuckLake lakehouse, a Lance table) cannot be opened, read or written as asked."""
