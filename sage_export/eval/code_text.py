"""A code text for perplexity, built from files every machine already has: Python's own standard library.

Rule (`stdlib_files` then `split`):
- root: `sysconfig.get_paths()["stdlib"]` of the running interpreter;
- files: every `*.py` below it, by relative POSIX path, sorted; skipped when any folder on the way is a test
  folder (`test`, `tests`, `idle_test`) or one of `idlelib`, `lib2to3`, `site-packages`, `dist-packages`,
  `__pycache__`;
- each file read whole, bytes as they are (UTF-8; every 3.11 stdlib file is), files joined with "\\n\\n" in
  that sorted order;
- dev/test split by a hash of the relative path: a file is in *test* when the first byte of
  sha256(relative path) is odd, else in *dev*. The two never share a file, and a file's side depends only on its
  own path, so a module keeps its side across Python versions even where the other files differ.

The stdlib differs between Python versions (and patch releases), so the texts do too: the manifest written with
them (`write_code_texts`) records the Python version, file counts, characters and the sha256 of each text.
The texts are read back as they are (`read_code_text`): not through perplexity.read_eval_text, whose
line-to-paragraph join is for WikiText and would double every newline of the code.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
from pathlib import Path

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages",
                       "__pycache__"})
SEPARATOR = "\n\n"
SPLIT_RULE = ("files sorted by relative POSIX path; test = first byte of sha256(relative path) is odd, dev = even; "
              f"skipped folders: {', '.join(sorted(SKIP_DIRS))}; files joined with two newlines")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the .py files that make the text, sorted."""
    root = Path(root) if root is not None else stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if path.is_file() and not SKIP_DIRS.intersection(rel.parts[:-1]):
            out.append(rel.as_posix())
    return sorted(out)


def side(rel_path: str) -> str:
    """"test" or "dev" for a relative path (first byte of its sha256 odd -> test)."""
    return "test" if hashlib.sha256(rel_path.encode("utf-8")).digest()[0] & 1 else "dev"


def split(files: list[str]) -> dict[str, list[str]]:
    """{"dev": [...], "test": [...]}, each in the given (sorted) order."""
    out: dict[str, list[str]] = {"dev": [], "test": []}
    for rel in files:
        out[side(rel)].append(rel)
    return out


def build_texts(root: Path | None = None) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({"dev": text, "test": text}, {"dev": files, "test": files})."""
    root = Path(root) if root is not None else stdlib_root()
    parts = split(stdlib_files(root))
    texts = {name: SEPARATOR.join((root / rel).read_bytes().decode("utf-8") for rel in files)
             for name, files in parts.items()}
    return texts, parts


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_code_texts(out_dir: Path, root: Path | None = None) -> dict:
    """Write code.dev.txt, code.test.txt and code.manifest.json into out_dir; returns the manifest."""
    root = Path(root) if root is not None else stdlib_root()
    texts, parts = build_texts(root)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "source": "Python standard library",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib": str(root),
        "rule": SPLIT_RULE,
        "texts": {},
    }
    for name in ("dev", "test"):
        data = texts[name].encode("utf-8")
        path = out_dir / f"code.{name}.txt"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)  # bytes, so no newline translation anywhere
        tmp.replace(path)
        manifest["texts"][name] = {
            "file": path.name,
            "files": len(parts[name]),
            "chars": len(texts[name]),
            "bytes": len(data),
            "sha256": _sha256(data),
            "file_list_sha256": _sha256("\n".join(parts[name]).encode("utf-8")),
            "first_files": parts[name][:3],
        }
    (out_dir / "code.manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_code_text(path: Path) -> str:
    """A code text exactly as written (no newline translation, no paragraph joining)."""
    return Path(path).read_bytes().decode("utf-8")
