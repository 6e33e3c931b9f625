"""Source resolution: local directories, the offline HF cache, and the messages on failure."""

from __future__ import annotations

import pytest

from adapterswap.errors import WeightsNotFoundError
from adapterswap.hub import cached_snapshot, resolve_source, weights_status


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def make_snapshot(cache, repo, files, revision="abc123"):
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / revision
    for f in files:
        (snap / f).parent.mkdir(parents=True, exist_ok=True)
        (snap / f).write_text("{}")
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snap


def test_complete_local_directory(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    resolved = resolve_source(str(tmp_path), what="backbone 'x'", required=["model_index.json"])
    assert resolved.local and resolved.local_files_only and resolved.source == str(tmp_path)


def test_incomplete_local_directory_names_path_and_files(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_source(str(tmp_path), what="backbone 'x'",
                       required=["model_index.json", "a.safetensors|a.bin"],
                       how_to_get="Download it with `hf download owner/name`.")
    message = str(info.value)
    assert str(tmp_path) in message
    assert "model_index.json, a.safetensors or a.bin" in message
    assert "hf download owner/name" in message


def test_nonexistent_path_is_not_taken_for_a_repo_id(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="neither an existing path"):
        resolve_source(str(tmp_path / "x" / "y" / "z"), what="adapter 'a'")


def test_offline_cache_hit_and_miss(hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = make_snapshot(hf_cache, "owner/model", ["model_index.json", "unet/config.json"])
    hit = resolve_source("owner/model", what="b", required=["model_index.json",
                                                            "unet/config.json"])
    assert not hit.local and hit.local_files_only and hit.cached_path == snap
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_source("owner/model", what="b", required=["vae/config.json"])
    with pytest.raises(WeightsNotFoundError, match="'owner/other' is not in the local"):
        resolve_source("owner/other", what="b")


def test_online_repo_id_is_left_to_from_pretrained(hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    resolved = resolve_source("owner/model", what="b", required=["model_index.json"])
    assert not resolved.local and not resolved.local_files_only and resolved.cached_path is None


def test_weights_status_without_network(hf_cache, tmp_path):
    make_snapshot(hf_cache, "owner/model", ["model_index.json"])
    assert weights_status("owner/model", ["model_index.json"]).where == "hf-cache"
    partial = weights_status("owner/model", ["model_index.json", "vae/x.safetensors"])
    assert not partial.present and partial.missing == ["vae/x.safetensors"]
    assert weights_status("owner/absent", ["model_index.json"]).where == "missing"
    assert cached_snapshot("owner/absent") is None


def test_download_failure_becomes_one_clear_error(hf_cache, monkeypatch):
    """Online, not cached, and the download fails (no network, gated repo): one line naming
    the model and how to get it."""
    from toy_plugin import ToyDev

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def no_network(self, source, *, local_files_only):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files\nmore")

    monkeypatch.setattr(ToyDev, "load_pipeline", no_network)
    with pytest.raises(WeightsNotFoundError) as info:
        ToyDev("owner/model", device="cpu").load()
    message = str(info.value)
    assert "'owner/model' could not be loaded" in message and "couldn't connect" in message
    assert "\n" not in message and "save_random" in message
