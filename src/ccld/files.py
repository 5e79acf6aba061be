"""Writing files so that a crash never leaves a half-written one under the final name.

Images, pipeline folders, training checkpoints and the latent cache all go through
`atomic_write`: the bytes go to a temporary name in the same folder (created exclusively, so two
processes never share one), are fsynced, and then replace the final name in one rename.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import CCLDError

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


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object],
                 what: str = "file",
                 fix: str = "check that the folder exists and is writable",
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
        raise CCLDError(f"{path}: could not write the {what} ({e.strerror or e}); {fix}") from None
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
