"""Provenance: code hash, weights identity, reference content, the runs table, and a store
that survives a failed COMMIT."""

from __future__ import annotations

import sqlite3
import sys

import pytest

from adapterswap.errors import StoreWriteError
from adapterswap.sweep import provenance
from adapterswap.sweep.store import RunStore


def test_code_hash_follows_the_source_of_a_plugin(tmp_path, monkeypatch):
    package = tmp_path / "fake_plugin_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    provenance._tree_hash.cache_clear()
    first = provenance.code_hash(["fake_plugin_pkg"])
    assert first == provenance.code_hash(["fake_plugin_pkg"])
    assert first != provenance.code_hash([])  # the plugin's code is part of it
    (package / "__init__.py").write_text("VALUE = 2\n")
    provenance._tree_hash.cache_clear()
    sys.modules.pop("fake_plugin_pkg", None)
    assert provenance.code_hash(["fake_plugin_pkg"]) != first


def test_local_weights_hash_follows_content_not_path(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    a = tmp_path / "a"
    b = tmp_path / "b"
    for folder in (a, b):
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
        (folder / "model_index.json").write_text("{}")
        (folder / "README.md").write_text(str(folder))  # not a weight file: ignored
    assert provenance.local_weights_hash(a) == provenance.local_weights_hash(b)
    assert (tmp_path / "cache" / "adapterswap" / "weights-hashes.json").is_file()
    (b / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert provenance.local_weights_hash(a) != provenance.local_weights_hash(b)
    (b / "scheduler").mkdir()
    before = provenance.local_weights_hash(b)
    (b / "scheduler" / "scheduler_config.json").write_text('{"timestep_spacing": "trailing"}')
    assert provenance.local_weights_hash(b) != before  # configs change pixels too
    assert provenance.weights_identity(str(a)).startswith("local:")


def test_hub_identity_is_the_cached_snapshot_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--owner--model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert provenance.weights_identity("owner/model") == f"hub:owner/model@{commit}"
    # offline and not cached: unresolved, never the empty string a default source had
    assert provenance.weights_identity("owner/absent") == "hub:owner/absent@unresolved"


def test_reference_identity_is_the_content(tmp_path):
    one = tmp_path / "one.png"
    two = tmp_path / "two.png"
    one.write_bytes(b"\x89PNG same")
    two.write_bytes(b"\x89PNG same")
    assert provenance.reference_identity(str(one)) == provenance.reference_identity(str(two))
    two.write_bytes(b"\x89PNG changed")
    assert provenance.reference_identity(str(one)) != provenance.reference_identity(str(two))
    assert provenance.reference_identity("synthetic:0") == "synthetic:0"


def _begin(store: RunStore, keys: list[str]) -> int:
    return store.begin_run(
        spec={"prompts": ["p"]}, versions={"adapterswap": "0"}, code_hash="c0de",
        weights={"backbone:sd15": "tiny:seed0"}, reference_hashes={}, device="cpu",
        dtype="float32",
        metrics={"sharpness": {"higher_is_better": True, "kind": "diagnostic"}},
        adapters={"object-ip-adapter": "object"}, cell_keys=keys, argv=["adapterswap"])


CONFIG = {"backbone": "sd15", "adapter": "none", "scale": None, "start": 0.0, "end": 1.0,
          "reference": "", "prompt": "p", "seed": 0, "steps": 1, "height": 64, "width": 64,
          "guidance_scale": None}


def test_runs_table_and_cells_point_at_their_run(tmp_path):
    with RunStore(tmp_path) as store:
        first = _begin(store, ["k1"])
        store.record_cell("k1", CONFIG, status="done", scores={"sharpness": 1.0},
                          extra={"timesteps": [999.0], "confounds": ["x"],
                                 "adapter_active_steps": 0, "start_noise": 0.5})
        second = _begin(store, ["k2"])
        store.record_cell("k2", {**CONFIG, "seed": 1}, status="done", scores={})
        assert second == first + 1
        runs = store.runs()
        assert [r["id"] for r in runs] == [first, second]
        assert runs[0]["code_hash"] == "c0de" and runs[0]["device"] == "cpu"
        assert runs[0]["dtype"] == "float32"
        assert store.current_keys() == {"k2"}
        rows = {r["key"]: r for r in store.rows()}
        assert rows["k1"]["run_id"] == first and rows["k2"]["run_id"] == second
        assert rows["k1"]["timesteps"] == [999.0] and rows["k1"]["confounds"] == ["x"]
        assert rows["k2"]["confounds"] == []
        assert store.metric_info()["sharpness"]["kind"] == "diagnostic"
        assert store.adapter_kinds()["object-ip-adapter"] == "object"
        with pytest.raises(ValueError, match="unknown cell columns"):
            store.record_cell("k3", CONFIG, status="done", scores={}, extra={"nope": 1})


def test_a_store_from_before_run_summaries_gains_the_column_and_keeps_its_runs(tmp_path):
    """A ``runs`` table written before ``invocation`` and ``summary`` existed: opening it adds
    both columns, its run reads back with no summary, and a new run stores one."""
    with RunStore(tmp_path) as store:
        old = _begin(store, ["k1"])
    with sqlite3.connect(tmp_path / "results.sqlite") as db:  # the older schema
        db.execute("ALTER TABLE runs DROP COLUMN summary")
        db.execute("ALTER TABLE runs DROP COLUMN invocation")
        assert "summary" not in {r[1] for r in db.execute("PRAGMA table_info(runs)")}
    with RunStore(tmp_path) as store:
        assert store.runs()[0]["id"] == old and store.runs()[0]["summary"] is None
        new = _begin(store, ["k2"])
        store.end_run(new, "done", summary={"done": 1, "seconds": 2.5,
                                             "fast_path": {"sd15": {"attention": "auto"}}})
        runs = store.runs()
    assert [r["status"] for r in runs] == ["running", "done"]
    assert runs[1]["summary"] == {"done": 1, "seconds": 2.5,
                                  "fast_path": {"sd15": {"attention": "auto"}}}


class _FailingCommit:
    """A connection whose COMMIT fails once, as on a full disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.failed = False

    def execute(self, sql: str, *args):
        if sql == "COMMIT" and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_failed_commit_is_rolled_back_and_the_store_stays_usable(tmp_path):
    with RunStore(tmp_path) as store:
        real = store.db
        store.db = _FailingCommit(real)
        with pytest.raises(StoreWriteError, match="disk is full"):
            store.record_cell("k1", CONFIG, status="done", scores={"sharpness": 1.0})
        assert not real.in_transaction  # rolled back, not left open
        store.record_cell("k2", CONFIG, status="done", scores={"sharpness": 2.0})
        store.db = real
        assert {r["key"] for r in store.rows()} == {"k2"}  # the failed cell was not kept


def test_latency_rows_are_keyed_by_everything_that_changes_the_time(tmp_path):
    base = {"backbone": "flux-schnell", "adapter": "infusenet", "scale": 1.0, "start": 0.0,
            "end": 1.0, "steps": 4, "batch": 1, "height": 64, "width": 64,
            "dtype": "bfloat16", "fast_path": "eager", "cache": ""}
    with RunStore(tmp_path) as store:
        store.record_latency({**base, "total_s": 1.0, "total_q1_s": 0.9, "total_q3_s": 1.1,
                              "denoise_s": 0.8, "repeats": 5, "samples_s": [1.0] * 5,
                              "method": "measured", "device": "cpu"})
        store.record_latency({**base, "scale": 0.0, "total_s": 0.5, "denoise_s": 0.4,
                              "repeats": 5, "method": "measured"})
        store.record_latency({**base, "dtype": "float32", "total_s": 2.0, "denoise_s": 1.9,
                              "repeats": 5, "method": "measured"})
        assert store.latency(base)["total_s"] == 1.0
        assert store.latency({**base, "scale": 0.0})["total_s"] == 0.5
        assert store.latency({**base, "dtype": "float32"})["total_s"] == 2.0
        assert store.latency({**base, "fast_path": "compiled"}) is None
        assert store.latency(base)["samples_s"] == [1.0] * 5
        assert len(store.latency_rows()) == 3


def test_an_old_store_gains_the_new_columns(tmp_path):
    db = sqlite3.connect(tmp_path / "results.sqlite")
    db.executescript("""
        CREATE TABLE cells (key TEXT PRIMARY KEY, backbone TEXT NOT NULL,
            adapter TEXT NOT NULL, scale REAL, start REAL, "end" REAL,
            reference TEXT NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
            steps INTEGER NOT NULL, height INTEGER NOT NULL, width INTEGER NOT NULL,
            guidance_scale REAL, status TEXT NOT NULL, error TEXT, image TEXT,
            timings TEXT, config TEXT NOT NULL, finished_at REAL NOT NULL);
        CREATE TABLE latency (backbone TEXT NOT NULL, adapter TEXT NOT NULL,
            steps INTEGER NOT NULL, height INTEGER NOT NULL, width INTEGER NOT NULL,
            total_s REAL NOT NULL, denoise_s REAL NOT NULL, repeats INTEGER NOT NULL,
            device TEXT, start REAL NOT NULL DEFAULT 0, "end" REAL NOT NULL DEFAULT 1,
            PRIMARY KEY (backbone, adapter, steps, height, width, start, "end"));
    """)
    db.close()
    with RunStore(tmp_path) as store:
        store.record_cell("k", CONFIG, status="done", scores={},
                          extra={"adapter_active_steps": 1})
        assert store.rows()[0]["adapter_active_steps"] == 1
        assert store.current_keys() is None  # no runs recorded: readers show every cell
        assert store.latency_rows() == []
