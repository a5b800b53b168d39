"""``aegir browse``: a local web page over the ``training_data`` table (map of chips + filterable thumbnails)."""

from aegir.browse.server import BrowseApp, BrowseServer, make_server, serve

__all__ = ["BrowseApp", "BrowseServer", "make_server", "serve"]
