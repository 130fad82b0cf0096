"""Bad input on the command line: one line naming the problem, non-zero exit, no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import make_tiny_model


def _lowbit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=300)


def _assert_clean_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    errs = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errs) == 1 and needle in errs[0], r.stderr


def test_missing_path(tmp_path):
    _assert_clean_error(_lowbit("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"), "no such file")


def test_dir_without_config(tmp_path):
    _assert_clean_error(_lowbit("generate", "--model", str(tmp_path), "--prompt", "hi"), "no config.json")


def test_pickle_refused(tmp_path):
    make_tiny_model("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    _assert_clean_error(_lowbit("generate", "--model", str(tmp_path), "--prompt", "hi"), "safetensors only")


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 40)
    r = _lowbit("generate", "--model", str(f), "--prompt", "hi")
    _assert_clean_error(r, "broken.gguf")


@pytest.mark.parametrize("bad", [["--temperature", "-1"], ["--max-tokens", "0"], ["--top-p", "1.5"]])
def test_impossible_sampling_parameter(bad):
    _assert_clean_error(_lowbit("generate", "--prompt", "hi", *bad), "invalid sampling parameter")
