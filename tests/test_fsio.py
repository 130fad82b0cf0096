"""publish_dir: the one atomic folder publish (checkpoints, GGUF import, the default model)."""
from __future__ import annotations

import os
import stat

import pytest

from lowbit.errors import LowbitError, ModelLoadError
from lowbit.fsio import publish_dir


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_publish_creates_the_folder_with_usual_permissions(tmp_path):
    target = tmp_path / "a" / "out"
    with publish_dir(target) as staging:
        assert staging.parent == target.parent and not target.exists()
        (staging / "f").write_text("x")
        os.chmod(staging / "f", 0o600)  # as safetensors creates its files
    assert (target / "f").read_text() == "x"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((target / "f").stat().st_mode) == 0o666 & ~umask
    assert _names(target.parent) == ["out"]


def test_existing_target_is_refused_unless_replace(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(ModelLoadError, match="already exists"):
        with publish_dir(target, error=ModelLoadError) as staging:
            raise AssertionError("never reached: refused before any work")
    with publish_dir(target, replace=True) as staging:
        (staging / "new").write_text("new")
    assert _names(target) == ["new"] and _names(tmp_path) == ["out"]


def test_failure_inside_the_block_leaves_the_old_folder_and_no_staging(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with publish_dir(target, replace=True) as staging:
            (staging / "new").write_text("new")
            raise RuntimeError("boom")
    assert _names(target) == ["old"] and _names(tmp_path) == ["out"]


def test_a_target_that_appears_meanwhile_is_not_overwritten(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(LowbitError, match="already exists"):
        with publish_dir(target) as staging:
            (staging / "ours").write_text("x")
            target.mkdir()
            (target / "theirs").write_text("y")  # another writer finished first
    assert _names(target) == ["theirs"] and _names(tmp_path) == ["out"]


def test_keep_leaves_a_good_target_and_drops_ours(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "done").write_text("")
    with publish_dir(target, replace=True, keep=lambda p: (p / "done").exists()) as staging:
        (staging / "ours").write_text("x")
    assert _names(target) == ["done"] and _names(tmp_path) == ["out"]


def test_a_file_in_the_way_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(LowbitError, match="not a folder"):
        with publish_dir(target, replace=True):
            pass
    assert target.read_text() == "a file"
