"""Writing a file so that readers see either the old contents or the new, never half."""

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import BinaryIO

_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Opens a temporary file next to `path` for binary writing; on success it
    replaces `path`.

    The temporary file lives in the same directory, so the final `os.replace` is a
    rename within one filesystem: atomic on POSIX and Windows. The data is flushed
    and `fsync`ed first, so a crash or power loss at any moment leaves either the old
    file or the complete new one. If the body raises, the temporary file is removed
    and `path` is untouched.

    **Arguments:**

    - `path`: the file to create or replace. Its directory must exist.

    **Yields:**

    A binary file object to write to.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(
        directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp"
    )
    # Not `tempfile.mkstemp`: that creates the file 0600, and the result should get
    # the permissions a plain `open` would give (0666 less the umask).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable. Not possible on every platform (Windows cannot
    # open a directory); the rename is still atomic there.
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
