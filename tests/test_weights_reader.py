"""SafetensorsCheckpoint: the one safetensors reader (fp loader, quantized loader, quantizer)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import ModelLoadError
from lowbit.models.weights import INDEX_FILE, SafetensorsCheckpoint


def _sharded(folder):
    folder.mkdir()
    a = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3), "a.bias": torch.ones(4, dtype=torch.bfloat16)}
    b = {"b.weight": torch.full((2, 2), 7, dtype=torch.float16)}
    save_file(a, str(folder / "model-00001-of-00002.safetensors"))
    save_file(b, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in a} | {k: "model-00002-of-00002.safetensors" for k in b}
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    return a | b


def test_sharded_checkpoint_reads_by_name(tmp_path):
    want = _sharded(tmp_path / "m")
    ckpt = SafetensorsCheckpoint(tmp_path / "m")
    assert sorted(ckpt.keys()) == sorted(want) and "b.weight" in ckpt and len(ckpt) == 3
    got = ckpt.read(["b.weight", "a.weight"])
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert ckpt.dtypes(["a.bias", "b.weight"]) == {"a.bias": torch.bfloat16, "b.weight": torch.float16}
    with ckpt.slice("a.weight") as sl:
        assert torch.equal(sl[1:3], want["a.weight"][1:3])
    assert {k: t.dtype for k, t in ckpt.items()} == {k: t.dtype for k, t in want.items()}
    with pytest.raises(ModelLoadError, match="no tensor c.weight"):
        ckpt.get("c.weight")


def test_missing_shard_and_bad_index_are_named(tmp_path):
    _sharded(tmp_path / "m")
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        SafetensorsCheckpoint(tmp_path / "m")
    (tmp_path / "m" / INDEX_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt index"):
        SafetensorsCheckpoint(tmp_path / "m")


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        SafetensorsCheckpoint(tmp_path)
