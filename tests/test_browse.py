"""``aegir browse``: the JSON endpoints and thumbnails on the real Jiang table, the CLI's start / Ctrl-C, and the page
driven end to end in headless Chromium (Debian's chromium + chromium-driver through Selenium)."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid as uuidlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import s2cell
from PIL import Image

from aegir.browse import make_server
from aegir.browse.thumbnails import THUMB_PX
from aegir.store import lance_io

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
RELABELLED = 12  # rows copied under a second dataset / provenance by the `browse_table` fixture


# ---------------------------------------------------------------------------------------------------- fixtures


@contextmanager
def running(root: str, uri: str, version: int | None = None) -> Iterator[str]:
    """A browse server on a free loopback port, serving in a thread; yields its base URL."""
    server = make_server(uri, root, "127.0.0.1", 0, version)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.url.rstrip("/")
    finally:
        server.shutdown()
        server.server_close()


def get(base: str, path: str, **params: Any) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET base+path?params."""
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def get_json(base: str, path: str, **params: Any) -> tuple[int, dict]:
    status, ctype, body = get(base, path, **params)
    assert ctype.startswith("application/json"), (status, ctype, body[:200])
    return status, json.loads(body)


def all_chips(base: str, **params: Any) -> list[dict]:
    status, page = get_json(base, "/api/chips", limit=500, **params)
    assert status == 200, page
    assert page["total"] == len(page["chips"])
    return page["chips"]


@pytest.fixture(scope="module")
def jiang_server(jiang_table) -> Iterator[tuple[str, Any]]:
    """(base URL, lance dataset) of a server over the 60-tile Jiang table."""
    settings, uri, ds = jiang_table
    with running(settings.lancedb_root, uri) as base:
        yield base, ds


@pytest.fixture(scope="module")
def browse_table(jiang_table, tmp_path_factory) -> dict[str, Any]:
    """A copy of the Jiang table plus a second commit: 12 chips again as dataset ``jiang_relabelled`` with
    provenance ``offline`` (round 1); two datasets, two provenances, two versions to travel between."""
    import lance

    _, uri, _ = jiang_table
    root = tmp_path_factory.mktemp("browse") / "lancedb"
    shutil.copytree(f"{uri}.lance", root / "training_data.lance")
    table = lance_io.open_training_table(str(root / "training_data"), str(root), create=False)
    before = table.version
    rows = sorted(table.to_arrow().to_pylist(), key=lambda r: r["metadata"]["sample_id"])[::5][:RELABELLED]
    for row in rows:
        row["uuid"] = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"relabelled:{row['uuid']}"))
        meta = row["metadata"]
        meta.update(dataset="jiang_relabelled", mask_source="offline")
        meta["provenance"].update(backend="offline", round=1)
    after = lance_io.upsert_training_rows(table, rows).version
    return {"root": str(root), "uri": str(root / "training_data"), "before": before, "after": after,
            "ds": lance.dataset(str(root / "training_data.lance"))}


@pytest.fixture(scope="module")
def browse_server(browse_table) -> Iterator[str]:
    with running(browse_table["root"], browse_table["uri"]) as base:
        yield base


def lance_uuids(ds, where: str | None = None) -> set[str]:
    """uuids matching ``where`` by a direct Lance query (the reference for the server's filters)."""
    return set(ds.to_table(columns=["uuid"], filter=where)["uuid"].to_pylist())


# ---------------------------------------------------------------------------------------------------- endpoints


def test_versions_and_facets_of_the_jiang_table(jiang_server):
    base, ds = jiang_server
    status, versions = get_json(base, "/api/versions")
    assert status == 200 and versions["latest"] == ds.version
    assert versions["versions"][-1] == {**versions["versions"][-1], "version": ds.version, "rows": 60}
    status, facets = get_json(base, "/api/facets")
    assert status == 200 and facets["rows"] == 60 and facets["version"] == ds.version
    assert facets["datasets"] == [{"value": "jiang_pv01", "count": 60}]
    assert facets["provenances"] == [{"value": "ground_truth", "count": 60}]
    lon0, lat0, lon1, lat1 = facets["extent"]
    assert 120 < lon0 < lon1 < 121 and 32 < lat0 < lat1 < 33


def test_chip_list_fields_footprints_and_paging(jiang_server):
    base, ds = jiang_server
    chips = all_chips(base)
    assert {c["uuid"] for c in chips} == lance_uuids(ds)
    first = chips[0]
    assert set(first) >= {"uuid", "sample_id", "dataset", "s2", "provenance", "acquired_at", "created_at",
                          "footprint", "centroid", "pv_fraction"}
    assert first["provenance"] == "ground_truth" and first["dataset"] == "jiang_pv01"
    assert len(first["footprint"]) == 4
    lons, lats = zip(*first["footprint"])
    assert min(lons) < first["centroid"][0] < max(lons) and min(lats) < first["centroid"][1] < max(lats)
    assert 20 < (max(lats) - min(lats)) * 111_000 < 32  # a 256 px chip at 0.1 m is ~25.6 m tall
    pages = [get_json(base, "/api/chips", limit=25, offset=o)[1] for o in (0, 25, 50)]
    assert [len(p["chips"]) for p in pages] == [25, 25, 10] and all(p["total"] == 60 for p in pages)
    assert [c["uuid"] for p in pages for c in p["chips"]] == [c["uuid"] for c in chips]


def test_filters_match_direct_lance_queries(browse_server, browse_table):
    base, ds = browse_server, browse_table["ds"]
    assert {c["uuid"] for c in all_chips(base, dataset="jiang_relabelled")} == \
        lance_uuids(ds, "metadata.dataset = 'jiang_relabelled'")
    assert {c["uuid"] for c in all_chips(base, provenance="offline")} == \
        lance_uuids(ds, "metadata.mask_source = 'offline'")
    relabelled = all_chips(base, dataset="jiang_relabelled")
    assert len(relabelled) == RELABELLED and {c["provenance"] for c in relabelled} == {"offline"}
    l13, l17 = relabelled[0]["s2"]["l13"], relabelled[0]["s2"]["l17"]
    by_l13 = {c["uuid"] for c in all_chips(base, s2=l13)}
    assert by_l13 == lance_uuids(ds, f"metadata.s2_token_l13 = '{l13}'") and 1 < len(by_l13) < 72
    assert {c["uuid"] for c in all_chips(base, s2=l17)} == lance_uuids(ds, f"metadata.s2_token_l17 = '{l17}'")
    both = {c["uuid"] for c in all_chips(base, s2=l13, dataset="jiang_relabelled")}
    assert both == lance_uuids(ds, f"metadata.s2_token_l13 = '{l13}' AND metadata.dataset = 'jiang_relabelled'")
    # levels that are not stored (12, 15, 5): checked against s2cell's parent of every stored level-17 token
    rows = ds.to_table(columns={"uuid": "uuid", "l17": "metadata.s2_token_l17"}).to_pylist()
    for level in (5, 12, 15):
        token = s2cell.token_to_parent_token(l17, level)
        expected = {r["uuid"] for r in rows if s2cell.token_to_parent_token(r["l17"], level) == token}
        page = get_json(base, "/api/chips", s2=token, limit=500)[1]
        assert {c["uuid"] for c in page["chips"]} == expected, level
        assert page["s2_cell"] and len(page["s2_cell"]) > 4  # the cell outline the map draws


def test_version_time_travel(browse_server, browse_table):
    base = browse_server
    old = get_json(base, "/api/facets", version=browse_table["before"])[1]
    new = get_json(base, "/api/facets")[1]
    assert (old["rows"], new["rows"]) == (60, 60 + RELABELLED) and new["version"] == browse_table["after"]
    assert [d["value"] for d in old["datasets"]] == ["jiang_pv01"]
    assert [d["value"] for d in new["datasets"]] == ["jiang_pv01", "jiang_relabelled"]
    assert len(all_chips(base, version=browse_table["before"])) == 60
    # a value that exists only in a later version is unknown in the earlier one
    status, body = get_json(base, "/api/chips", version=browse_table["before"], dataset="jiang_relabelled")
    assert status == 400 and "unknown dataset" in body["error"]


@pytest.mark.parametrize("params, needle", [
    ({"dataset": "nope"}, "unknown dataset"),
    ({"dataset": "jiang_pv01' OR '1'='1"}, "unknown dataset"),
    ({"provenance": "x') OR TRUE --"}, "unknown provenance"),
    ({"s2": "35b125' OR 1=1 --"}, "hex"),
    ({"s2": "zz"}, "hex"),
    ({"s2": "35b1252c0"}, "canonical"),
    ({"s2": "35b1252c7c000001"}, "level 30"),
    ({"limit": "0"}, "limit"),
    ({"limit": "100000"}, "limit"),
    ({"offset": "-1"}, "offset"),
    ({"version": "999"}, "version 999 does not exist"),
    ({"version": "1;DROP"}, "version"),
    ({"where": "1=1"}, "unknown parameter"),
])
def test_bad_filters_answer_400(browse_server, browse_table, params, needle):
    status, body = get_json(browse_server, "/api/chips", **params)
    assert status == 400 and needle in body["error"] and body["status"] == 400
    assert browse_table["ds"].count_rows() == 60 + RELABELLED


def test_repeated_parameter_answers_400(browse_server):
    status, _, body = get(browse_server, "/api/chips?dataset=jiang_pv01&dataset=jiang_relabelled")
    assert status == 400 and "more than once" in json.loads(body)["error"]


def test_thumbnail_is_a_png_of_the_expected_size(jiang_server):
    base, ds = jiang_server
    chip = all_chips(base)[0]
    status, ctype, png = get(base, f"/api/thumb/{chip['uuid']}.png")
    assert status == 200 and ctype == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (THUMB_PX, THUMB_PX) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels == (255, 0, 255)).all(axis=-1).any()  # the mask outline: this chip holds PV (pv_fraction > 0)
    assert chip["pv_fraction"] > 0
    assert get(base, f"/api/thumb/{chip['uuid']}.png", version=ds.version)[2] == png  # cached, same bytes


def test_thumbnail_of_unknown_or_malformed_uuid(jiang_server):
    base, _ = jiang_server
    status, body = get_json(base, f"/api/thumb/{uuidlib.uuid4()}.png")
    assert status == 404 and "no chip" in body["error"]
    status, body = get_json(base, "/api/thumb/" + urllib.parse.quote("x' OR '1'='1") + ".png")
    assert status == 400 and "not a chip uuid" in body["error"]


def test_page_static_files_and_unknown_paths(jiang_server):
    base, _ = jiang_server
    status, ctype, html = get(base, "/")
    assert status == 200 and ctype.startswith("text/html") and b"/static/app.js" in html
    for name in ("app.js", "style.css"):
        status, _, body = get(base, f"/static/{name}")
        assert status == 200 and body
        html += body
    # no CDN or other remote asset: every src / href / url() / fetch / import is local
    assert not re.search(rb"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|fetch\(\s*["'`]https?:|"""
                         rb"""import\s.*["']https?:""", html)
    for path in ("/static/../server.py", "/static/server.py", "/nope", "/api/nope"):
        assert get(base, path)[0] == 404, path


def test_cli_prints_the_url_and_stops_on_ctrl_c(jiang_table):
    settings, uri, _ = jiang_table
    proc = subprocess.Popen([sys.executable, "-m", "aegir", "browse", "--uri", uri, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split("serving ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:"), line
        status, facets = get_json(url.rstrip("/"), "/api/facets")
        assert status == 200 and facets["rows"] == 60
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in out


def test_cli_refuses_a_remote_host_without_allow_remote(jiang_table):
    _, uri, _ = jiang_table
    done = subprocess.run([sys.executable, "-m", "aegir", "browse", "--uri", uri, "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "--allow-remote" in done.stdout + done.stderr, (done.stdout, done.stderr)


# ---------------------------------------------------------------------------------------------------- access


def _request(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON or {}) of GET ``url`` with ``headers``."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            status, head, body = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, body = exc.code, dict(exc.headers), exc.read()
    return status, head, json.loads(body) if head.get("Content-Type", "").startswith("application/json") else {}


def test_a_remote_address_needs_allow_remote_and_every_request_the_token(jiang_table, monkeypatch):
    """0.0.0.0 is refused without ``allow_remote``; with it, requests without the token answer 401 and carry no
    data, the token works as bearer header, as ``?token=`` (which sets the page's cookie) and as that cookie."""
    from aegir.browse.server import TOKEN_COOKIE, TOKEN_ENV

    settings, uri, _ = jiang_table
    with pytest.raises(ValueError, match="--allow-remote"):
        make_server(uri, settings.lancedb_root, "0.0.0.0", 0)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    generated = make_server(uri, settings.lancedb_root, "0.0.0.0", 0, allow_remote=True)
    generated.server_close()
    assert len(generated.token) >= 32 and generated.url.endswith(f"?token={generated.token}")
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment-7f3a")
    server = make_server(uri, settings.lancedb_root, "0.0.0.0", 0, allow_remote=True)
    assert server.token == "from-the-environment-7f3a"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for url, headers in ((f"{base}/api/facets", {}), (f"{base}/api/facets?token=wrong", {}),
                             (f"{base}/api/facets", {"Authorization": "Bearer wrong"}),
                             (f"{base}/api/facets", {"Cookie": f"{TOKEN_COOKIE}=wrong"}), (f"{base}/", {})):
            status, _, body = _request(url, headers)
            assert status == 401 and "rows" not in body, (url, headers, body)
        status, _, facets = _request(f"{base}/api/facets", {"Authorization": "Bearer from-the-environment-7f3a"})
        assert status == 200 and facets["rows"] == 60
        status, head, _ = _request(f"{base}/?token=from-the-environment-7f3a")
        assert status == 200 and head["Set-Cookie"].startswith(f"{TOKEN_COOKIE}=from-the-environment-7f3a;")
        assert "HttpOnly" in head["Set-Cookie"] and "SameSite=Strict" in head["Set-Cookie"]
        status, _, page = _request(f"{base}/api/chips?limit=5", {"Cookie": head["Set-Cookie"].split(";")[0]})
        assert status == 200 and len(page["chips"]) == 5
    finally:
        server.shutdown()
        server.server_close()


def test_a_store_failure_answers_500_with_an_id_not_the_exception_text(jiang_table, tmp_path, capsys):
    """The table vanishes under a running server: the 500 names an id; the log holds the id and the reason."""
    settings, uri, _ = jiang_table
    root = tmp_path / "lancedb"
    shutil.copytree(f"{uri}.lance", root / "training_data.lance")
    with running(str(root), str(root / "training_data")) as base:
        assert get_json(base, "/api/facets")[1]["rows"] == 60
        shutil.rmtree(root / "training_data.lance")
        status, body = get_json(base, "/api/facets")
    assert status == 500 and body["id"] and set(body) == {"error", "id", "status"}
    assert str(tmp_path) not in body["error"] and "Error" not in body["error"], body
    log = capsys.readouterr().err
    assert f"error {body['id']}:" in log and "training_data.lance" in log, log


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture()
def browser(tmp_path) -> Iterator[Any]:
    """Headless Debian Chromium through Selenium, offline, with a fresh profile."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make test` installs Debian's chromium + chromium-driver "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


_SHOWN = """return {cards: [...document.querySelectorAll('#grid .card')].map(c => c.dataset.uuid),
  map: [...document.querySelectorAll('#map [data-uuid]')].map(c => c.dataset.uuid),
  images: [...document.querySelectorAll('#grid img')].map(i => [i.complete, i.naturalWidth]),
  state: document.body.dataset.state, loads: Number(document.body.dataset.loads || 0),
  error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent};"""


def wait_loaded(driver, after: int = 0) -> dict:
    """Wait for a chip load newer than ``after`` and for every thumbnail to finish; what the page shows."""
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d) -> dict | bool:
        shown = d.execute_script(_SHOWN)
        ok = shown["state"] == "ready" and shown["loads"] > after and all(c for c, _ in shown["images"])
        return shown if ok else False

    return WebDriverWait(driver, 90, poll_frequency=0.2).until(done)


def assert_thumbnails_render(shown: dict) -> None:
    assert shown["images"] and all(width > 0 for _, width in shown["images"]), shown["images"]
    assert len(shown["images"]) == len(shown["cards"])


def test_browse_page_end_to_end_in_headless_chromium(browse_server, browse_table, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    ds, total = browse_table["ds"], 60 + RELABELLED
    browser.get(browse_server + "/")
    shown = wait_loaded(browser)
    assert_thumbnails_render(shown)
    assert len(shown["cards"]) == 60 and shown["map"] == shown["cards"] and shown["error"] is None
    assert f"{total} of {total} chips" in browser.find_element(By.ID, "summary").text
    browser.find_element(By.ID, "more").click()  # page two
    shown = wait_loaded(browser, shown["loads"])
    assert_thumbnails_render(shown)
    assert set(shown["cards"]) == set(shown["map"]) == lance_uuids(ds)

    Select(browser.find_element(By.ID, "f-dataset")).select_by_value("jiang_relabelled")
    shown = wait_loaded(browser, shown["loads"])
    assert_thumbnails_render(shown)
    expected = lance_uuids(ds, "metadata.dataset = 'jiang_relabelled'")
    assert len(expected) == RELABELLED and set(shown["cards"]) == set(shown["map"]) == expected

    browser.find_element(By.ID, "clear").click()
    shown = wait_loaded(browser, shown["loads"])
    token = ds.to_table(columns={"t": "metadata.s2_token_l13"}, filter="metadata.dataset = 'jiang_relabelled'",
                        limit=1)["t"][0].as_py()
    s2 = browser.find_element(By.ID, "f-s2")
    s2.send_keys(token, Keys.ENTER)
    shown = wait_loaded(browser, shown["loads"])
    assert_thumbnails_render(shown)
    expected = lance_uuids(ds, f"metadata.s2_token_l13 = '{token}'")
    assert 0 < len(expected) < total and set(shown["cards"]) == set(shown["map"]) == expected
    assert browser.find_elements(By.CSS_SELECTOR, "#map .cell")  # the S2 cell outline is drawn
    assert f"{len(expected)} of {total} chips" in browser.find_element(By.ID, "summary").text
    assert f"s2={token}" in browser.current_url  # the filter state is in the URL
    first = browser.find_element(By.CSS_SELECTOR, "#grid .card")
    ActionChains(browser).move_to_element(first).perform()  # hovering a thumbnail highlights its footprint
    hot = browser.find_elements(By.CSS_SELECTOR, "#map .hot")
    assert [el.get_attribute("data-uuid") for el in hot] == [first.get_attribute("data-uuid")]
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "summary")).perform()

    artifact = REPO / "test-artifacts" / "browse.png"
    artifact.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(tmp_path / "browse.png"))
    shutil.copyfile(tmp_path / "browse.png", artifact)
    assert Image.open(artifact).size[0] > 1000

    s2.clear()
    s2.send_keys("not-a-token", Keys.ENTER)
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(_SHOWN)["error"])
    assert "S2 token" in browser.execute_script(_SHOWN)["error"]
