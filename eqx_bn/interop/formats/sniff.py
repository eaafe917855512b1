"""One entry point for every checkpoint format: Flax msgpack, Orbax, PyTorch."""

import os
from typing import Any

from ..._typing import typecheck
from .errors import CheckpointError
from .msgpack import ProgressCallback, read_msgpack
from .orbax import read_orbax
from .safetensors import read_safetensors
from .torch_pickle import _LEGACY_TORCH, read_torch


@typecheck
def read_checkpoint(
    path: str | os.PathLike, *, progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Reads a checkpoint: Flax msgpack, Orbax, PyTorch or safetensors.

    A directory is read with [`eqx_bn.interop.read_orbax`][]. A file is told by
    its first bytes (and a `.safetensors` suffix): a zip archive, or a pickle
    starting as torch.save's legacy format does (which `read_torch` refuses with
    an explanation), with [`eqx_bn.interop.read_torch`][], a safetensors file with
    [`eqx_bn.interop.read_safetensors`][], anything else with
    [`eqx_bn.interop.read_msgpack`][]. The tree is returned as stored: a saved
    Flax `TrainState` gives `{"params": ..., "batch_stats": ..., "step": ...,
    "opt_state": ...}`, which [`eqx_bn.interop.load_flax`][] accepts; a PyTorch
    `state_dict` gives `{"layer1.0.bn1.running_var": ..., ...}`, which
    [`eqx_bn.interop.load_torch`][] accepts.

    **Arguments:**

    - `path`: the checkpoint file or directory.
    - `progress`: for a msgpack file, called as `progress(bytes_read, total)`.

    **Returns:**

    Nested dicts of numpy arrays and scalars.

    **Raises:**

    - `CheckpointError`: `path` does not exist, or cannot be read (see the four
        readers: `read_orbax`, `read_torch`, `read_safetensors`, `read_msgpack`).
    - `ImportError`: `path` is a directory and `orbax-checkpoint` is not installed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_orbax(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no such checkpoint file or directory: {path!r}")
    kind = checkpoint_kind(path)
    if kind == "torch":
        return read_torch(path)
    if kind == "safetensors":
        return read_safetensors(path)
    return read_msgpack(path, progress=progress)


def checkpoint_kind(path: str) -> str:
    """Which reader: `torch`, `safetensors` or `msgpack`, from the first bytes."""
    if path.endswith(".safetensors"):
        return "safetensors"
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return "msgpack"  # its reader says what is wrong
    # A zip archive (torch.save), or the pickled magic number of torch.save's
    # legacy format (which read_torch explains). A Flax msgpack file starts with a
    # map marker, never with these.
    if head[:4] == b"PK\x03\x04" or head[:3] == _LEGACY_TORCH:
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":
        if int.from_bytes(head[:8], "little") + 8 <= size:
            return "safetensors"
    return "msgpack"
