"""Write outputs so that an interrupted run never leaves a half-written artifact where a finished one is expected.

A directory is built in a hidden temporary sibling (same filesystem, so the final step is a rename) and only
moved into place when the block that fills it finishes; single files are written beside their target and
os.replace'd over it.

A process killed outright (SIGKILL, the OOM killer) cannot clean up after itself, so the sibling's name carries the
writer's process id: the next run for the same output removes siblings whose writer no longer exists, and says so.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _check_writable_parent(final: Path) -> None:
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {parent}: permission denied")


def _make_hidden_sibling(final: Path, tag: str) -> Path:
    """Create an empty directory `.<name>.<tag>-<pid>-XXXXXXXX` next to final (mode from the umask, like mkdir)."""
    while True:
        candidate = final.parent / f".{final.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_siblings(final: Path) -> list[Path]:
    """Delete the temporary siblings of `final` left by writers that were killed; returns what was removed.
    Siblings of a live process (another run writing the same output right now) are left alone."""
    removed = []
    for path in final.parent.glob(f".{final.name}.tmp-*"):
        pid = path.name[len(f".{final.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            _remove(path)
            removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output_dir(final: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `final`, on any exception (Ctrl-C included) it
    is deleted and nothing at `final` changes. An existing `final` is replaced only when force is True."""
    final = Path(final).absolute()
    if final.exists() and not force:
        raise FileExistsError(f"{final} already exists; pass --force to overwrite it")
    _check_writable_parent(final)
    for stale in remove_stale_siblings(final):
        print(f"note: removed {stale.name}, left by an earlier run that was killed before it finished")
    temp = _make_hidden_sibling(final, "tmp")
    try:
        yield temp
    except BaseException:
        _remove(temp)
        raise
    _move_into_place(temp, final)


def _move_into_place(temp: Path, final: Path) -> None:
    if not final.exists():
        os.rename(temp, final)
        return
    # Two renames instead of delete-then-rename: the old output stays whole until the new one is in place.
    old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
    os.rename(final, old)
    try:
        os.rename(temp, final)
    except BaseException:
        os.rename(old, final)
        _remove(temp)
        raise
    _remove(old)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary handle on a hidden temporary file in path's directory, os.replace'd onto path when the block
    ends without error and removed when it raises."""
    path = Path(path)
    temp = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
    try:
        with open(temp, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path via a hidden temporary file in the same directory and os.replace."""
    with atomic_file(path) as handle:
        handle.write(data)


def atomic_write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))
