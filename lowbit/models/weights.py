"""Reading safetensors checkpoints (single file or sharded), refusing pickles, with clear errors."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: corrupt index file ({e})") from None
        files = [model_dir / n for n in names]
        missing = [str(f.name) for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{model_dir}: shards listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelLoadError(
            f"{model_dir}: only pickle checkpoints found ({', '.join(pickles)}); lowbit loads safetensors only "
            "(pickle files can run arbitrary code). Convert it with safetensors first."
        )
    raise ModelLoadError(f"{model_dir}: no *.safetensors weight files found")


def iter_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) lazily, file by file (safetensors memory-maps, so RAM stays small)."""
    for f in safetensors_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ModelLoadError(f"{f}: corrupt or truncated safetensors file ({e})") from None


def read_tensors(model_dir: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    return {n: t for n, t in iter_tensors(model_dir) if names is None or n in names}
