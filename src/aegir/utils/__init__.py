"""Small, dependency-light helpers (geometry indexing, array utilities)."""
