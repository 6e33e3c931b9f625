"""The compile cache (:mod:`adapterswap.fastpath.compile_cache`): what torch compiled is saved
per card, torch, dtype, backbone, mode, scope and size, loaded back before compiling, and
ignored with a note when it is another setup's or unreadable; the auto-compile policy counts a
warm cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from adapterswap.fastpath import compile_cache


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "adapterswap" / "compile"


def key(**overrides):
    fields = dict(backbone="flux-schnell", device="cpu", dtype=torch.bfloat16,
                  mode="default", scope="regions", sizes={(1024, 1024)})
    fields.update(overrides)
    return compile_cache.cache_key(**fields)


def test_the_key_names_what_compiled_code_depends_on():
    base = key()
    assert base["torch"] == torch.__version__ and base["device"] == "cpu"
    assert base["sizes"] == [[1024, 1024]] and base["dtype"] == "torch.bfloat16"
    for change in (dict(backbone="flux-dev"), dict(dtype=torch.float16), dict(mode="max-autotune"),
                   dict(scope="model"), dict(sizes={(864, 1152)})):
        assert compile_cache._path(key(**change)) != compile_cache._path(base), change


def test_save_then_load_hands_torch_the_same_bytes(cache_home, monkeypatch):
    given = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts",
                        lambda: (b"compiled kernels", {"inductor": ["x"]}))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", given.append)
    notes = []
    assert not compile_cache.is_warm(key())
    assert compile_cache.load(key(), notes.append) is False and notes == []  # cold, silently
    path = compile_cache.save(key(), notes.append)
    assert path.parent == cache_home and path.read_bytes() == b"compiled kernels"
    assert json.loads(path.with_suffix(".json").read_text())["key"] == key()
    assert compile_cache.is_warm(key()) and not compile_cache.is_warm(key(sizes={(512, 512)}))
    assert compile_cache.load(key(), notes.append) is True
    assert given == [b"compiled kernels"] and "saved" in notes[0]
    assert not list(cache_home.glob(".*tmp"))  # written atomically, nothing left over


def test_nothing_compiled_saves_nothing(cache_home, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert compile_cache.save(key(), print) is None and not cache_home.exists()


def test_another_setups_or_a_broken_file_is_ignored_with_a_note(cache_home, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"kernels", None))
    path = compile_cache.save(key(), lambda note: None)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["key"]["torch"] = "1.0"  # written by another torch (or copied from another machine)
    path.with_suffix(".json").write_text(json.dumps(meta))
    notes = []
    assert compile_cache.load(key(), notes.append) is False
    assert "ignored" in notes[0] and "1.0" in notes[0]
    assert not compile_cache.is_warm(key())

    compile_cache.save(key(), lambda note: None)

    def refuse(data):
        raise ValueError("bad magic number")

    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", refuse)
    notes.clear()
    assert compile_cache.load(key(), notes.append) is False
    assert "could not read it" in notes[0] and "bad magic number" in notes[0]


def test_a_warm_cache_lets_compiling_repay_itself_sooner():
    from adapterswap.fastpath.profile import CompileProfile

    profile = CompileProfile(backbone="flux-schnell", pays_after_forwards=100)
    few = 20
    assert not profile.repays(few)
    assert profile.repays(int(few / compile_cache.WARM_COMPILE_SHARE))


@pytest.mark.slow
def test_a_new_process_reuses_what_another_compiled(tmp_path):
    """The real torch API: a compiled function's artifacts saved by one process and loaded by
    another, whose compile then hits inductor's cache (tens of seconds on a CPU)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, time, torch\n"
        "from adapterswap.fastpath import compile_cache\n"
        "key = compile_cache.cache_key(backbone='toy', device='cpu', dtype=torch.float32,\n"
        "                              mode='default', scope='model', sizes={(8, 8)})\n"
        "loaded = compile_cache.load(key, print)\n"
        "f = torch.compile(lambda x: torch.sin(x) * 2 + 1)\n"
        "start = time.perf_counter(); f(torch.randn(8)); took = time.perf_counter() - start\n"
        "compile_cache.save(key, print)\n"
        "print('RESULT', loaded, took)\n")
    runs = []
    for index in range(2):
        env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"),
               "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{index}"),
               "PATH": "/usr/bin:/bin"}
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             env=env, timeout=600, check=True).stdout
        line = next(line for line in out.splitlines() if line.startswith("RESULT"))
        runs.append(line.split()[1:])
    assert runs[0][0] == "False" and runs[1][0] == "True"  # the second process loaded it
