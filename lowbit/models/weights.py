"""The one reader of safetensors checkpoints (single file or sharded): tensors by name, read lazily.

Every reader of model weights goes through SafetensorsCheckpoint: the fp model loader, the
quantized-checkpoint loader and the layer-by-layer quantizer. It refuses pickles (unpickling can
run arbitrary code) and turns a missing, truncated or corrupt file into a ModelLoadError naming it.

Why lazily: the quantizer must handle models larger than RAM. A file is opened (memory-mapped) only
while tensors are read from it, so its pages leave the process again afterwards.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def pickle_refusal(path: Path) -> str:
    return (
        f"{path.name} is a pickle checkpoint; lowbit loads safetensors only, because unpickling "
        "can run arbitrary code. Convert it to safetensors with a tool you trust first."
    )


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the shards its index names, else every *.safetensors."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index}: corrupt index file ({e})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shards named in {INDEX_FILE} are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise ModelLoadError(pickle_refusal(pickles[0]))
    raise ModelLoadError(f"{folder}: no *.safetensors weight files found")


@contextmanager
def _opened(path: Path):
    """safe_open with safetensors' own errors (bad header, short file) as ModelLoadError."""
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    with handle as st:
        yield st


def read_file(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Tensors `names` of one safetensors file, the file open only meanwhile."""
    with _opened(path) as st:
        out = {}
        for n in names:
            try:
                out[n] = st.get_tensor(n)
            except Exception as e:
                raise ModelLoadError(f"{path}: cannot read tensor {n} ({e})") from None
        return out


class SafetensorsCheckpoint:
    """Tensor name -> file, indexed once from the file headers; tensors read on demand."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.files = safetensors_files(self.folder)
        self.where: dict[str, Path] = {}
        for f in self.files:
            with _opened(f) as st:
                for name in st.keys():
                    self.where[name] = f

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: object) -> bool:
        return name in self.where

    def __len__(self) -> int:
        return len(self.where)

    def file_of(self, name: str) -> Path:
        if name not in self.where:
            raise ModelLoadError(f"{self.folder}: checkpoint has no tensor {name}")
        return self.where[name]

    def _by_file(self, names: Iterable[str]) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of(n), []).append(n)
        return by_file

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in the dtype stored; each file opened once, only while read."""
        out: dict[str, torch.Tensor] = {}
        for f, group in self._by_file(names).items():
            out.update(read_file(f, group))
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def dtypes(self, names: Iterable[str]) -> dict[str, torch.dtype]:
        """The stored dtype of each tensor, from the file headers (no data read); float32 for
        dtypes other than the floating ones."""
        out: dict[str, torch.dtype] = {}
        for f, group in self._by_file(names).items():
            with _opened(f) as st:
                for n in group:
                    out[n] = _DTYPES.get(st.get_slice(n).get_dtype(), torch.float32)
        return out

    @contextmanager
    def slice(self, name: str):
        """safetensors' slice of one tensor (index it to read only those rows), its file open
        while the block runs."""
        with _opened(self.file_of(name)) as st:
            yield st.get_slice(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, file by file (memory-mapped, so RAM stays small)."""
        for f in self.files:
            with _opened(f) as st:
                for name in st.keys():
                    try:
                        t = st.get_tensor(name)
                    except Exception as e:
                        raise ModelLoadError(f"{f}: cannot read tensor {name} ({e})") from None
                    yield name, t


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint folder as (name, tensor), file by file."""
    return SafetensorsCheckpoint(model_dir).items()
