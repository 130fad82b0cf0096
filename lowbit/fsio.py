"""Publishing a folder atomically: build it in a staging folder next to the target, then rename.

Why: whoever reads the folder (a server loading a checkpoint, another process using the cached
default model) must never see it half written, and a write that fails or is interrupted must leave
nothing behind and must not destroy what was there. The staging folder is a sibling of the target,
so it lies on the same filesystem and the final rename is atomic. Its files are fsynced before the
rename and the parent folder after it, so a crash cannot publish a folder whose data is not on disk.

A leaf module (it imports only lowbit.errors): models (GGUF import, the default model) and quant
(checkpoints) both publish through it.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LowbitError


def check_target(target: Path, replace: bool, *, error: type[LowbitError] = LowbitError,
                 hint: str = "pass force to replace it") -> None:
    """Refuse up front, before any work, what publishing would refuse at the end: an existing
    target without `replace`, or a target that is not a folder."""
    if target.exists() and not replace:
        raise error(f"output folder {target} already exists; {hint}")
    if target.exists() and not target.is_dir():
        raise error(f"output path {target} exists and is not a folder")


@contextmanager
def publish_dir(
    target: str | os.PathLike,
    *,
    replace: bool = False,
    keep: Callable[[Path], bool] | None = None,
    error: type[LowbitError] = LowbitError,
) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends normally, put it in place as `target`.

    An existing target is kept when keep(target) says it is good (another writer finished first:
    ours is discarded), else replaced when `replace`, else refused with `error`. A replaced target
    is moved aside and deleted only once the new one is in place (put back if that fails). On any
    exception, inside the block or while publishing, the staging folder is removed.
    """
    target = Path(target).absolute()
    if keep is None or not (target.exists() and keep(target)):
        check_target(target, replace, error=error)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, "tmp")
    staging.mkdir()
    try:
        yield staging
        _usual_permissions(staging)
        _fsync_tree(staging)
        _publish(staging, target, replace, keep, error)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _sibling(target: Path, kind: str) -> Path:
    """A hidden, unique name next to target (same filesystem, so renames between them are atomic)."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _publish(staging: Path, target: Path, replace: bool, keep, error: type[LowbitError]) -> None:
    # A concurrent writer can change the target between our look and our rename: look again then.
    for _ in range(3):
        if not os.path.lexists(target):
            try:
                os.rename(staging, target)  # fails if something appeared there meanwhile (unless an empty folder)
            except OSError as exc:
                if os.path.lexists(target):
                    continue
                raise error(f"cannot put {target} in place: {exc}") from None
            _fsync_dir(target.parent)
            return
        if keep is not None and keep(target):
            return  # the caller's finally discards ours
        if not replace:
            raise error(f"{target} already exists; it was not replaced")
        old = _sibling(target, "old")
        try:
            os.rename(target, old)
        except FileNotFoundError:
            continue  # someone else moved it away: try again
        except OSError as exc:
            raise error(f"cannot move the existing {target} aside: {exc}") from None
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    raise error(f"cannot put {target} in place: it keeps changing under us")


def _usual_permissions(folder: Path) -> None:
    """safetensors (and mkdtemp) create owner-only files; a published folder obeys the umask,
    like anything open() or mkdir() makes."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def _fsync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_dir(Path(root))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync a folder
        pass
