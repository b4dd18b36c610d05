"""The code evaluation text (sage_export/eval/code_text.py, tools/make_code_text.py): which stdlib files go in, in
what order, how they are joined, that dev and test never share a file, and that the manifest describes the
texts actually written."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

from sage_export.eval import code_text
from sage_export.eval.code_text import (SEPARATOR, build_texts, read_code_text, side, split, stdlib_files,
                                        write_code_texts)

REPO = Path(__file__).resolve().parents[1]

KEPT = ["a.py", "b/__init__.py", "b/c.py", "b/testing.py", "test_like.py", "z/deep/mod.py"]
SKIPPED = ["test/test_a.py", "b/test/x.py", "b/tests/y.py", "idlelib/run.py", "idlelib/idle_test/t.py",
           "lib2to3/fixer.py", "site-packages/pkg/m.py", "dist-packages/q.py", "b/__pycache__/c.py"]


def fake_stdlib(root: Path) -> Path:
    for rel in KEPT + SKIPPED:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {rel}\nx = 1\r\n", encoding="utf-8", newline="")  # a CRLF must survive as is
    (root / "notes.txt").write_text("not python")
    (root / "b" / "data.pyc").write_bytes(b"\0")
    return root


def test_files_are_sorted_py_outside_skipped_folders(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    assert stdlib_files(root) == sorted(KEPT)


def test_split_is_by_path_hash_disjoint_and_complete():
    files = [f"pkg{i}/mod{j}.py" for i in range(20) for j in range(10)]
    parts = split(files)
    assert set(parts["dev"]).isdisjoint(parts["test"])
    assert sorted(parts["dev"] + parts["test"]) == sorted(files)
    for rel in files:
        odd = hashlib.sha256(rel.encode()).digest()[0] % 2 == 1
        assert (rel in parts["test"]) == odd and side(rel) == ("test" if odd else "dev")
    # a file's side depends on its path only: adding other files (another Python version) does not move it
    more = split(sorted(files + [f"new{i}.py" for i in range(50)]))
    assert set(parts["test"]) <= set(more["test"]) and set(parts["dev"]) <= set(more["dev"])
    assert 70 < len(parts["test"]) < 130  # roughly balanced, not all on one side


def test_texts_join_whole_files_in_sorted_order(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    texts, parts = build_texts(root)
    for name in ("dev", "test"):
        expected = SEPARATOR.join((root / rel).read_bytes().decode() for rel in parts[name])
        assert texts[name] == expected
        assert parts[name] == sorted(parts[name])
    assert "\r\n" in texts["dev"] + texts["test"]


def test_written_texts_and_manifest_agree(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    manifest = write_code_texts(tmp_path / "out", root)
    on_disk = json.loads((tmp_path / "out" / "code.manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["python_version"] == platform.python_version() and manifest["stdlib"] == str(root)
    total = 0
    for name in ("dev", "test"):
        entry = manifest["texts"][name]
        data = (tmp_path / "out" / f"code.{name}.txt").read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        assert entry["chars"] == len(read_code_text(tmp_path / "out" / entry["file"]))
        total += entry["files"]
    assert total == len(KEPT)
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_real_stdlib_texts_are_deterministic_and_disjoint():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert not any(part in code_text.SKIP_DIRS for f in files for part in f.split("/")[:-1])
    assert "os.py" in files and "json/__init__.py" in files
    assert not any(f.startswith(("test/", "idlelib/", "lib2to3/")) for f in files)
    texts, parts = build_texts()
    assert set(parts["dev"]).isdisjoint(parts["test"]) and len(parts["dev"]) + len(parts["test"]) == len(files)
    assert build_texts()[0] == texts
    assert min(len(texts["dev"]), len(texts["test"])) > 100_000  # enough for several 2048-token windows


def test_cli_writes_the_three_files(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "make_code_text.py"), "--out", str(tmp_path / "o"),
                           "--stdlib", str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["code.dev.txt", "code.manifest.json",
                                                                 "code.test.txt"]
    manifest = json.loads((tmp_path / "o" / "code.manifest.json").read_text())
    assert manifest["texts"]["test"]["sha256"] in proc.stdout
