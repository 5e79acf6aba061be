"""Writing files so that a crash never leaves a half-written one under the final name.

Images, training checkpoints and the latent cache all go through `atomic_write`: the bytes go to
a temporary name in the same folder (created exclusively, so two processes never share one), are
fsynced, and then replace the final name in one rename. Pipeline folders go through
`write_folder`, which does the same for a whole folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from ..errors import CCLDError

TEMP_SUFFIX = ".tmp"


def temporary_name(path: Path) -> Path:
    """A unique hidden name beside `path`; `remove_stale_temporaries` finds those a killed
    process left."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# what to do about a write that failed for these reasons, whatever the caller's usual advice
FIXES = {errno.ENOSPC: "free some space on that disk, or write somewhere else",
         getattr(errno, "EDQUOT", -1): "free some of your disk quota, or write somewhere else",
         errno.EROFS: "the disk is read-only: write somewhere else"}


DEFAULT_FIX = "check that the folder exists and is writable"


def _fix_for(error: OSError, fix: str) -> str:
    """The advice for a failed write: its cause's (FIXES), then the caller's own, if it has one."""
    cause = FIXES.get(error.errno)
    if cause is None:
        return fix
    return cause if fix == DEFAULT_FIX else f"{cause}; {fix}"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object],
                 what: str = "file",
                 fix: str = DEFAULT_FIX,
                 exclusive: bool = False) -> Path:
    """Calls `write(file)` on a temporary file beside `path`, then moves it into place.

    A failure to write is a one-line CCLDError "`path`: could not write the `what` (reason);
    `fix`"; whatever was at `path` before stays as it was. `exclusive`: never replace a file
    already at `path` (FileExistsError instead), even one another process has just written.
    """
    path = Path(path).expanduser()
    tmp = temporary_name(path)
    try:
        # os.open with 0o666 respects the umask, as an ordinary file creation would.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _publish_exclusively(tmp, path)
        else:
            os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if exclusive and isinstance(e, FileExistsError):
            raise  # the name is taken: the caller picks another
        raise CCLDError(f"{path}: could not write the {what} ({e.strerror or e}); "
                        f"{_fix_for(e, fix)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def _publish_exclusively(tmp: Path, path: Path) -> None:
    """Gives the complete file `tmp` the name `path` unless that name is taken (FileExistsError).

    A hard link claims the name and shows the whole file in one step. Where the file system has
    no hard links (FAT, some network shares), an empty file claims the name first and the rename
    then fills it, so a crash in between can leave that empty file.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(tmp, path)
        return
    tmp.unlink()


def remove_stale_temporaries(folder: Path) -> None:
    """Deletes temporary files a killed process left behind (they are never complete)."""
    for p in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        p.unlink(missing_ok=True)


# Folders that appear whole or not at all

RENAME_EXCHANGE = 2  # renameat2's flag: two names swap their files in one step (Linux)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps the folders at `a` and `b` in one step where the system can (Linux's renameat2);
    False where it cannot, so that the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc before 2.28, musl)
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE)
    return done == 0


def _remove_abandoned(folder: Path) -> None:
    """Removes the temporary siblings of `folder` that writers killed mid-write left behind
    (their process is gone)."""
    for tmp in folder.parent.glob(f".{folder.name}.*{TEMP_SUFFIX}"):
        try:
            pid = int(tmp.name[len(folder.name) + 2:].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, OSError):
            continue


def write_folder(folder: str | os.PathLike, write: Callable[[Path], object], what: str,
                 replaceable: Callable[[Path], bool]) -> Path:
    """Writes a folder so that it appears whole or not at all: `write(tmp)` fills a new
    temporary folder beside it, whose files are then fsynced, and which then takes the folder's
    name in one step (swapped with an older folder there, which is then removed).

    An existing folder is replaced only if it is empty or `replaceable(folder)` says it is an
    earlier one of the same kind; anything else there is refused, never deleted. A write that
    fails or is interrupted leaves the older folder as it was.
    """
    folder = Path(folder).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise CCLDError(f"{folder}: a file, not a folder; pass a folder path for the {what}")
        if any(folder.iterdir()) and not replaceable(folder):
            raise CCLDError(f"{folder}: a folder that holds other files, not a {what}; pass a "
                            f"new folder (or an earlier {what}, which is then replaced whole)")
    tmp = temporary_name(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(folder)
        tmp.mkdir()
        write(tmp)
        for path in sorted(tmp.rglob("*"), reverse=True):  # files first, then their folders
            _fsync_path(path)
        fsync_folder(tmp)
        if not folder.exists():
            os.rename(tmp, folder)
        elif _exchange(tmp, folder):
            shutil.rmtree(tmp, ignore_errors=True)  # the older folder, now under tmp's name
        else:
            old = temporary_name(folder)
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except OSError:
                os.rename(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CCLDError(f"{folder}: could not write the {what} ({e.strerror or e}); pass a "
                        "folder you can write to, with room for the weights") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_folder(folder.parent)
    return folder


def _fsync_path(path: Path) -> None:
    if path.is_dir():
        fsync_folder(path)
        return
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
