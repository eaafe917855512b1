"""One entry point for both checkpoint formats."""

import os
from typing import Any

from .._typing import typecheck
from .errors import CheckpointError
from .msgpack import ProgressCallback, read_msgpack
from .orbax import read_orbax


@typecheck
def read_checkpoint(
    path: str | os.PathLike, *, progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Reads a Flax checkpoint: a msgpack file or an Orbax directory.

    A file is read with [`eqx_bn.interop.read_msgpack`][], a directory with
    [`eqx_bn.interop.read_orbax`][]. The tree is returned as stored: a saved
    `TrainState` gives `{"params": ..., "batch_stats": ..., "step": ...,
    "opt_state": ...}`, which [`eqx_bn.interop.load_flax`][] accepts.

    **Arguments:**

    - `path`: the checkpoint file or directory.
    - `progress`: for a msgpack file, called as `progress(bytes_read, total)`.

    **Returns:**

    Nested dicts of numpy arrays and scalars.

    **Raises:**

    - `CheckpointError`: `path` does not exist, or cannot be read (see the two
        readers).
    - `ImportError`: `path` is a directory and `orbax-checkpoint` is not installed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_orbax(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no such checkpoint file or directory: {path!r}")
    return read_msgpack(path, progress=progress)
