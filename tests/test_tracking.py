"""Opening tracking stores: atomic creation of a local store, clear errors otherwise."""

from __future__ import annotations

import pytest

from harness.tracking import TrackingStoreError, open_client


def test_a_new_sqlite_store_is_built_aside_and_renamed_into_place(tmp_path):
    database = tmp_path / "deep" / "store.db"
    client = open_client(f"sqlite:///{database}")
    assert database.is_file()
    assert [p.name for p in database.parent.iterdir()] == ["store.db"]  # no staging left
    experiment_id = client.create_experiment("facts")
    again = open_client(f"sqlite:///{database}")  # reopening keeps what is there
    assert again.get_experiment_by_name("facts").experiment_id == experiment_id


def test_a_broken_store_file_is_named_with_what_to_do(tmp_path):
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"this is not a database")
    with pytest.raises(TrackingStoreError, match=f"if {database} is a store left half-built"):
        open_client(f"sqlite:///{database}")


def test_an_unknown_scheme_is_refused(tmp_path):
    with pytest.raises(TrackingStoreError, match="pass --tracking-uri"):
        open_client("nosuchscheme://x")
