"""A directory written whole or not at all, and the cleanup after a write that was interrupted.

:func:`write_directory_atomically` writes into a hidden sibling ".<name>.tmp-<pid>-<id>" (same
filesystem, so renames are atomic), every file fsynced, then renamed into place. An existing directory is
first renamed to ".<name>.old-<pid>-<id>" and removed once the new one is in place, so at every instant
"<name>" is absent or complete; recover_directory() puts the old copy back after a crash in between.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

TMP_MARK, OLD_MARK = ".tmp-", ".old-"


def fsync_path(path: Path) -> None:
    """Flushes a file or a directory entry to disk, where the platform and filesystem allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a directory on Windows: nothing to flush
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def replace_file(path: Path, write: Any) -> None:
    """Replaces one file atomically with what ``write(tmp_path)`` writes (a hidden sibling, fsynced, renamed)."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def owner_alive(name: str) -> bool:
    """Whether the process named in a ``.<dir>.tmp-<pid>-<id>`` entry is another live process."""
    try:
        pid = int(name.rsplit("-", 2)[-2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_entry(path: Path) -> None:
    """Removes a file, a link or a directory tree, whichever ``path`` is; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_directory(directory: str | os.PathLike) -> list[Path]:
    """Cleans up after an interrupted :func:`write_directory_atomically` of ``directory``.

    Removes its hidden temporary siblings (``.<name>.tmp-*``, never complete); if ``directory`` is
    missing but a previous copy (``.<name>.old-*``) exists, the newest is renamed back, and other old
    copies are removed. Entries of processes that are still running are left alone.

    Returns:
        The entries removed or restored.
    """
    out = Path(directory)
    if not out.parent.is_dir():
        return []
    touched, olds = [], []
    for entry in out.parent.iterdir():
        if owner_alive(entry.name):
            continue
        if entry.name.startswith(f".{out.name}{TMP_MARK}"):
            remove_entry(entry)
            touched.append(entry)
        elif entry.name.startswith(f".{out.name}{OLD_MARK}"):
            olds.append(entry)
    for entry in sorted(olds, key=lambda p: p.stat().st_mtime, reverse=True):
        if not out.exists() and entry.is_dir():
            os.rename(entry, out)  # the crash came between moving the old copy away and the new one in
        else:
            remove_entry(entry)
        touched.append(entry)
    if touched:
        fsync_path(out.parent)
    return touched


def recover_directories(parent: str | os.PathLike) -> list[Path]:
    """:func:`recover_directory` for every directory in ``parent`` that an interrupted write left traces of."""
    root = Path(parent)
    if not root.is_dir():
        return []
    names = {
        entry.name[1 : entry.name.rindex(marker)]
        for entry in root.iterdir()
        for marker in (TMP_MARK, OLD_MARK)
        if entry.name.startswith(".") and marker in entry.name[1:]
    }
    return [p for name in sorted(names) for p in recover_directory(root / name)]


def write_directory_atomically(directory: str | os.PathLike, write: Any) -> Path:
    """Creates or replaces ``directory`` with what ``write(tmp)`` puts into an empty directory ``tmp``.

    Readers see the old directory or the new one, complete and fsynced, never a part or a mixture. An
    existing ``directory`` is replaced as a whole (what ``write`` does not write is gone). Traces of an
    earlier interrupted write are cleaned first (:func:`recover_directory`).

    Args:
        directory: the directory to create or replace; its parent is created if needed.
        write: fills the (hidden, sibling) temporary directory it is given.

    Returns:
        ``directory`` as a Path.
    """
    out = Path(directory)
    if out.name in ("", ".", ".."):
        out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(out)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}{TMP_MARK}{token}"
    tmp.mkdir()
    try:
        write(tmp)
        for dirpath, _, names in os.walk(tmp):
            for name in names:
                fsync_path(Path(dirpath) / name)
            fsync_path(Path(dirpath))
        if out.exists():
            old = out.parent / f".{out.name}{OLD_MARK}{token}"
            os.rename(out, old)
            os.rename(tmp, out)
            fsync_path(out.parent)
            remove_entry(old)
        else:
            os.rename(tmp, out)
        fsync_path(out.parent)
    except BaseException:
        remove_entry(tmp)
        raise
    return Path(directory)
