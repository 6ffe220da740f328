"""Files written so that a crash at any moment leaves either the old file or the new one.

A SIGKILL (or a power cut) mid-write leaves the temporary file ``.<name>.<random>.tmp`` next
to the target: no process is left to delete it. The next write of the same target deletes
such leftovers, and only those no live writer holds: each writer locks its temporary file
(``flock``) while it writes, and the lock dies with its process, so a save in progress in
another process is left alone. Readers never look at these dot-files.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; leftovers of killed writers stay
    fcntl = None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, flush it to disk, then rename it over ``path`` in one step.

    The temporary file sits in the same directory, so the rename never crosses file systems.
    On any error (a full disk, a kill) the previous ``path`` is untouched.
    """
    path = Path(path)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until close: marks the file as being written
        write(tmp)
        follow_umask(Path(tmp))  # mkstemp's 0o600 would survive the rename
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def remove_leftovers(path: Path) -> None:
    """Delete the temporary files of earlier writes of ``path`` whose writer was killed: those
    no process holds locked (a live writer's lock makes the attempt fail)."""
    if fcntl is None:
        return
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            fd = os.open(leftover, os.O_RDONLY)
        except OSError:
            continue  # renamed or deleted meanwhile by its writer
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            leftover.unlink(missing_ok=True)
        except OSError:
            pass  # a live writer holds it
        finally:
            os.close(fd)


def follow_umask(*paths: Path) -> None:
    """Give files 0o666 and folders 0o777 less the umask, as ``open`` and ``mkdir`` would:
    ``mkstemp``, ``mkdtemp`` and safetensors create them readable by their owner alone."""
    mask = os.umask(0)  # the only way to read the umask is to set it
    os.umask(mask)
    for path in paths:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def fsync_dir(directory: Path) -> None:
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
