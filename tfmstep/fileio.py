"""Atomic file writes: a reader (or a run restarted after a kill) sees the old file or the new one, never
half of one.

``atomic_write`` writes to a temporary file in the same directory, flushes and fsyncs it, then
``os.replace``s it over the target (atomic on POSIX and Windows) and fsyncs the directory so the rename
itself survives a power cut. A kill at any point leaves the previous file intact; at worst a stray
``.<name>.*.tmp`` file stays behind, which ``remove_stale_temporaries`` cleans on the next start.

Errors (disk full, read-only file system, permissions) become one ``UserError`` line that names the file
and says the previous version is untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from tfmstep.errors import UserError

_TMP_SUFFIX = ".tmp"


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def fsync_directory(directory: str) -> None:
    """Make a rename or a new file in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mode_for(path: str) -> int:
    """The existing file's permissions, else what ``open`` would give a new file (0o666 minus umask)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` atomically (temp file + fsync + os.replace + directory fsync)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(path), suffix=_TMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
        tmp = None
        fsync_directory(directory)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e} (the previous version of the file, if "
                        f"any, is untouched)") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write_json(path: str, value: Any) -> None:
    atomic_write(path, json.dumps(value, indent=2) + "\n")


def atomic_save_figure(figure, path: str, **savefig_options) -> None:
    """Save a matplotlib figure to ``path`` atomically: rendered to memory in the format ``path``'s suffix
    names, then ``atomic_write`` (``savefig`` itself writes the file in place)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format=os.path.splitext(path)[1].lstrip(".") or None, **savefig_options)
    atomic_write(path, buffer.getvalue())


def remove_stale_temporaries(directory: str) -> list:
    """Delete ``.<name>.*.tmp`` files an ``atomic_write`` killed before its rename left in ``directory``;
    returns their paths. Only this module's own temporaries match; nothing else is touched."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX) and name.count(".") >= 3):
            continue
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def check_writable(directory: str) -> None:
    """Create ``directory`` if needed and prove a file can be created in it (root ignores permission bits,
    so ``os.access`` is not enough; a read-only mount only shows on a real write)."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe.", suffix=_TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror or e}; nothing was changed -- make it "
                        f"writable or use another --workdir") from None
