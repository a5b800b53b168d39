"""``aegir browse``: a small local web page over the ``training_data`` table, served by the standard library.

Routes (GET): ``/`` and ``/static/<file>`` (the page shipped in ``static/``), ``/api/versions``,
``/api/facets?version=``, ``/api/chips?dataset=&s2=&provenance=&limit=&offset=&version=`` and
``/api/thumb/<uuid>.png?version=``. Bad input answers 400 with ``{"error": …}``, an unknown uuid or path 404; a
failure of the store answers 500 with an ``id`` only (the exception goes to the server's log under that id).

Access: on a loopback address anyone on this machine may read the page. Any other address needs ``allow_remote``
and a token: requests carry it as ``Authorization: Bearer <token>`` or ``?token=<token>`` (the first page load; it
is then kept in an HttpOnly, SameSite=Strict cookie for the page's own requests); others answer 401.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import secrets
import socket
import sys
import threading
import uuid as uuidlib
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from aegir.browse.thumbnails import row_thumbnail
from aegir.store.chip_browse import BadQuery, BrowseSource, ChipFilter
from aegir.store.lance_io import StoreError

STATIC_DIR = Path(__file__).with_name("static")
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
TOKEN_ENV = "AEGIR_BROWSE_TOKEN"  # the token of a remote browse server, when not generated
TOKEN_COOKIE = "aegir_browse_token"
THUMB_CACHE_SIZE = 1024
PAGE_SIZE = 60
_PARAMS = {
    "/api/versions": set(),
    "/api/facets": {"version"},
    "/api/chips": {"version", "dataset", "s2", "provenance", "limit", "offset"},
    "/api/thumb": {"version"},
}


@dataclass(frozen=True)
class Response:
    """What a route answers: status, content type, body and extra headers."""

    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def json_response(payload: Any, status: int = 200) -> Response:
    """``payload`` as a JSON response (not cached by the browser)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, "application/json; charset=utf-8", body, {"Cache-Control": "no-store"})


def _error(status: int, message: str) -> Response:
    return json_response({"error": message, "status": status}, status)


def _internal_error(exc: BaseException) -> Response:
    """A 500 naming only an id; the exception goes to stderr (the server's log) under the same id, since its text
    can hold paths, bucket names or endpoints the page's readers should not see."""
    error_id = uuidlib.uuid4().hex[:12]
    sys.stderr.write(f"aegir browse: error {error_id}: {type(exc).__name__}: {exc}\n")
    return json_response({"error": f"internal error {error_id} (see the server's log)", "id": error_id,
                          "status": 500}, 500)


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def access_token(host: str, allow_remote: bool, token: str | None = None) -> str | None:
    """The token requests must carry: None on a loopback ``host`` unless one is given; elsewhere ``token``, the
    environment's :data:`TOKEN_ENV` or a new random one. ValueError for a remote ``host`` without
    ``allow_remote``."""
    if is_loopback(host):
        return token or None
    if not allow_remote:
        raise ValueError(f"--host {host} is not a loopback address: the table would be served to the network; "
                         "pass --allow-remote to do so (requests then need a token)")
    return token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)


def _params(route: str, query: str) -> dict[str, str]:
    """Single-valued query parameters of ``route``; blank values count as absent. BadQuery for anything else."""
    parsed = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(parsed) - _PARAMS[route])
    if unknown:
        raise BadQuery(f"unknown parameter(s) {', '.join(map(repr, unknown))}; use {sorted(_PARAMS[route])}")
    repeated = [k for k, v in parsed.items() if len(v) > 1]
    if repeated:
        raise BadQuery(f"parameter(s) {', '.join(map(repr, repeated))} given more than once")
    return {k: v[0].strip() for k, v in parsed.items() if v[0].strip()}


def _int(params: dict[str, str], name: str, default: int | None) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    if not value.isdigit() or len(value) > 12:
        raise BadQuery(f"{name} must be a non-negative integer, got {value[:40]!r}")
    return int(value)


class BrowseApp:
    """Routes requests to the store and renders thumbnails (LRU-cached per version and uuid)."""

    def __init__(self, source: BrowseSource, default_version: int | None = None) -> None:
        if default_version is not None:
            source.dataset(default_version)  # fail early on a version that does not exist
        self.source = source
        self.default_version = default_version
        self._thumbs: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def handle(self, path: str, query: str = "") -> Response:
        """The response to ``GET path?query``."""
        try:
            if path in ("/", "/index.html"):
                return self._static("index.html")
            if path.startswith("/static/"):
                return self._static(path.removeprefix("/static/"))
            if path.startswith("/api/thumb/") and path.endswith(".png"):
                return self._thumb(unquote(path.removeprefix("/api/thumb/").removesuffix(".png")),
                                   _params("/api/thumb", query))
            if path in _PARAMS:
                return self._api(path, _params(path, query))
            return _error(404, f"no such page {path[:100]!r}")
        except BadQuery as exc:
            return _error(400, str(exc))
        except (StoreError, ValueError, OSError) as exc:
            return _internal_error(exc)

    def _version(self, params: dict[str, str]) -> int | None:
        return _int(params, "version", self.default_version)

    def _api(self, route: str, params: dict[str, str]) -> Response:
        if route == "/api/versions":
            versions = self.source.versions()
            return json_response({"versions": versions, "latest": versions[-1]["version"] if versions else None,
                                  "default": self.default_version, "location": self.source.location})
        if route == "/api/facets":
            return json_response(self.source.facets(self._version(params)))
        chip_filter = ChipFilter(params.get("dataset"), params.get("s2", "").lower() or None,
                                 params.get("provenance"))
        page = self.source.chips(chip_filter, self._version(params), _int(params, "limit", PAGE_SIZE),
                                 _int(params, "offset", 0))
        return json_response(page)

    def _static(self, name: str) -> Response:
        if name not in STATIC_FILES:
            return _error(404, f"no such file {name[:100]!r}")
        return Response(200, STATIC_FILES[name], (STATIC_DIR / name).read_bytes(), {"Cache-Control": "no-cache"})

    def _thumb(self, uuid: str, params: dict[str, str]) -> Response:
        version = self._version(params)
        ds_version = int(self.source.dataset(version).version)
        key = (ds_version, uuid)
        with self._lock:
            png = self._thumbs.get(key)
            if png is not None:
                self._thumbs.move_to_end(key)
        if png is None:
            row = self.source.chip_row(uuid, ds_version)
            if row is None:
                return _error(404, f"no chip with uuid {uuid!r} in version {ds_version}")
            png = row_thumbnail(row)
            with self._lock:
                self._thumbs[key] = png
                while len(self._thumbs) > THUMB_CACHE_SIZE:
                    self._thumbs.popitem(last=False)
        cache = "public, max-age=86400, immutable" if version is not None else "no-cache"
        return Response(200, "image/png", png, {"Cache-Control": cache})


class _Handler(BaseHTTPRequestHandler):
    server: "BrowseServer"
    server_version = "aegir-browse"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        split = urlsplit(self.path)
        query, given = _without_token(split.query)
        if self.server.token is None or self._authorised(given):
            response = self.server.app.handle(split.path, query)
        else:
            response = _error(401, "this browse server needs its token: ?token=… or Authorization: Bearer …")
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in response.headers.items():
            self.send_header(name, value)
        if given is not None and self.server.token and response.status != 401:  # the checked token, not the input
            self.send_header("Set-Cookie", f"{TOKEN_COOKIE}={self.server.token}; HttpOnly; SameSite=Strict; Path=/")
        self.end_headers()
        self.wfile.write(response.body)

    def _authorised(self, query_token: str | None) -> bool:
        """Whether the request carries the server's token (query, bearer header or cookie), compared in constant
        time."""
        offered = [query_token, self.headers.get("Authorization", "").removeprefix("Bearer ").strip()]
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == TOKEN_COOKIE:
                offered.append(value)
        expected = self.server.token.encode()
        return any(hmac.compare_digest(o.encode(), expected) for o in offered if o)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        if self.server.log_requests:
            message = format % args
            if self.server.token:
                message = message.replace(self.server.token, "***")  # the request line holds ?token=
            sys.stderr.write(f"{self.address_string()} {message}\n")


class BrowseServer(ThreadingHTTPServer):
    """A threading HTTP server carrying the :class:`BrowseApp` its handlers call."""

    daemon_threads = True

    def __init__(self, app: BrowseApp, host: str, port: int, log_requests: bool = False,
                 token: str | None = None) -> None:
        self.app, self.log_requests, self.token = app, log_requests, token
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        """The page's address (with ``?token=`` when the server has one)."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/" + (f"?token={self.token}" if self.token else "")


def _without_token(query: str) -> tuple[str, str | None]:
    """``query`` without its ``token`` parameter, and that token (None when absent)."""
    kept, token = [], None
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        if unquote(name) == "token":
            token = unquote(value)
        else:
            kept.append(part)
    return "&".join(kept), token


def make_server(uri: str | None, lancedb_root: str, host: str = "127.0.0.1", port: int = 8765,
                version: int | None = None, log_requests: bool = False, allow_remote: bool = False,
                token: str | None = None) -> BrowseServer:
    """A bound (not yet serving) browser over the table at ``uri``; port 0 picks a free port. A ``host`` that is not
    loopback needs ``allow_remote`` and serves only with a token (:func:`access_token`)."""
    required = access_token(host, allow_remote, token)  # before the table is opened or a port bound
    return BrowseServer(BrowseApp(BrowseSource(uri, lancedb_root), version), host, port, log_requests, required)


def serve(server: BrowseServer, announce: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C, then close the socket."""
    try:
        announce(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
