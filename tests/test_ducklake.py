import duckdb
import pyarrow as pa
import pytest

from aegir.config import Settings
from aegir.store import ducklake


def test_extensions_come_from_the_registry_packages():
    for name in ("ducklake", "spatial"):
        path = ducklake.extension_path(name)
        assert path.is_file() and "site-packages" in str(path) and duckdb.__version__ in str(path)


def test_missing_extension_package_is_a_clear_error():
    with pytest.raises(ducklake.ExtensionMissingError, match=r"pip install duckdb-extension-nosuchthing==1\.5\.5"):
        ducklake.extension_path("nosuchthing")


def test_local_attach_creates_catalog_and_data_path(settings):
    con = ducklake.connect(settings)
    try:
        assert con.execute("SELECT ST_AsText(ST_Point(1, 2))").fetchone()[0] == "POINT (1 2)"
        newest = f"SELECT max(snapshot_id) FROM {settings.ducklake_alias}.snapshots()"
        before = ducklake.current_snapshot_id(con, settings)
        assert before == con.execute(newest).fetchone()[0] == 0  # a fresh catalog: only snapshot 0 (schema main)
        con.execute(f"CREATE TABLE {settings.ducklake_alias}.probe (x INTEGER)")
        assert ducklake.current_snapshot_id(con, settings) == con.execute(newest).fetchone()[0] == before + 1
    finally:
        con.close()
    assert settings.ducklake_catalog.endswith("catalog.ducklake")
    from pathlib import Path

    assert Path(settings.ducklake_catalog).exists() and Path(settings.ducklake_data_path).is_dir()


def test_production_attach_statement_postgres_and_s3():
    settings = Settings(
        ducklake_catalog="postgres:dbname=pv_lake host=db.internal user=aegir",
        ducklake_data_path="s3://pv-bucket/lake/",
        s3_region="auto",
        s3_endpoint="acct.r2.cloudflarestorage.com",
    )
    assert ducklake.attach_statement(settings) == (
        "ATTACH 'ducklake:postgres:dbname=pv_lake host=db.internal user=aegir' AS lake "
        "(DATA_PATH 's3://pv-bucket/lake/')"
    )
    assert ducklake.needed_extensions(settings) == ["ducklake", "spatial", "postgres_scanner", "httpfs", "aws"]
    secret = ducklake.s3_secret_statement(settings)
    assert secret.startswith("CREATE OR REPLACE SECRET") and "PROVIDER credential_chain" in secret
    assert "ENDPOINT 'acct.r2.cloudflarestorage.com'" in secret and "REGION 'auto'" in secret


def test_local_settings_need_no_network_extensions(settings):
    assert ducklake.needed_extensions(settings) == ["ducklake", "spatial"]
    assert ducklake.s3_secret_statement(settings) is None


def test_quotes_in_paths_are_escaped():
    settings = Settings(ducklake_catalog="data/o'brien.ducklake", ducklake_data_path="data/o'brien/")
    assert "'ducklake:data/o''brien.ducklake'" in ducklake.attach_statement(settings)


@pytest.mark.parametrize("bad", ["Raw", "x-y", "", "a b", "drop;table", "ünï"])
def test_dataset_names_are_validated(bad):
    with pytest.raises(ValueError, match="dataset name"):
        ducklake.label_table_name(bad)


def _batch(hashes):
    return pa.table({"row_hash": hashes, "dataset_name": ["t"] * len(hashes), "value": list(range(len(hashes)))})


def test_failed_write_rolls_back_to_previous_snapshot(settings):
    con = ducklake.connect(settings)
    try:
        empty = pa.table({"row_hash": pa.array([], pa.string())})
        first = ducklake.write_label_batch(con, settings, "t", _batch(["a", "b"]), empty)
        assert first.inserted == 2
        bad = pa.table({"row_hash": ["c"], "dataset_name": ["t"], "value": ["not a number"]})
        with pytest.raises(duckdb.Error):
            ducklake.write_label_batch(con, settings, "t", bad, empty)
        assert con.execute("SELECT count(*) FROM lake.raw_t").fetchone()[0] == 2
        assert ducklake.current_snapshot_id(con, settings) == first.snapshot_id
        again = ducklake.write_label_batch(con, settings, "t", _batch(["a", "b", "c"]), empty)
        assert (again.inserted, again.already_present) == (1, 2)
    finally:
        con.close()


def test_a_plain_http_object_store_turns_ssl_off_and_bad_flags_name_their_source():
    from aegir.config import ConfigError, load_settings

    env = {"AEGIR_DUCKLAKE_DATA_PATH": "s3://b/lake/", "AEGIR_S3_ENDPOINT": "127.0.0.1:9000",
           "AEGIR_S3_USE_SSL": "false"}
    settings = load_settings(environ=env)
    assert settings.s3_use_ssl is False and "USE_SSL false" in ducklake.s3_secret_statement(settings)
    assert "USE_SSL" not in ducklake.s3_secret_statement(settings.replace(s3_use_ssl=None))  # AWS: the default
    assert load_settings(environ={**env, "AEGIR_S3_USE_SSL": "TRUE"}).s3_use_ssl is True
    with pytest.raises(ConfigError, match="s3_use_ssl must be true or false.*'maybe'"):
        load_settings(environ={**env, "AEGIR_S3_USE_SSL": "maybe"})
    from aegir.store.lance_io import object_store_env  # LanceDB reaches the same store through AWS_* variables

    assert object_store_env(settings) == {"AWS_ENDPOINT": "http://127.0.0.1:9000", "AWS_ALLOW_HTTP": "true"}
    r2 = Settings(s3_endpoint="acct.r2.cloudflarestorage.com", s3_region="auto", s3_url_style="vhost")
    assert object_store_env(r2) == {"AWS_ENDPOINT": "https://acct.r2.cloudflarestorage.com", "AWS_REGION": "auto",
                                    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "true"}
    assert object_store_env(Settings()) == {}  # AWS itself: the credential chain and its defaults


def test_commit_conflicts_are_retried_a_bounded_number_of_times():
    """``retry_on_conflict`` reruns a transaction that lost a commit race, and only that."""
    from aegir.store.ducklake.connection import retry_on_conflict

    calls = []

    def losing(times: int, error: type[duckdb.Error] = duckdb.TransactionException,
               text: str = "Transaction conflict: another writer committed first"):
        def transaction() -> str:
            calls.append(1)
            if len(calls) <= times:
                raise error(text)
            return "committed"
        return transaction

    assert retry_on_conflict(losing(2), retries=4) == "committed" and len(calls) == 3
    calls.clear()
    with pytest.raises(duckdb.TransactionException):
        retry_on_conflict(losing(5), retries=3)
    assert len(calls) == 3  # bounded: the third conflict propagates
    calls.clear()
    with pytest.raises(duckdb.CatalogException):  # not a conflict: no retry
        retry_on_conflict(losing(1, duckdb.CatalogException, "Table raw_x does not exist"), retries=3)
    assert len(calls) == 1
