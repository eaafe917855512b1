"""One entry point for every checkpoint format: Flax msgpack, Orbax, PyTorch."""

import os
from collections.abc import Sequence
from typing import Any

from ..._typing import typecheck
from .errors import CheckpointError
from .msgpack import ProgressCallback, read_msgpack
from .orbax import read_orbax
from .safetensors import read_safetensors
from .sniff import checkpoint_kind
from .torch_pickle import read_torch
from .tree import select_entries


@typecheck
def read_checkpoint(
    path: str | os.PathLike,
    *,
    progress: ProgressCallback | None = None,
    keys: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Reads a checkpoint: Flax msgpack, Orbax, PyTorch or safetensors.

    A directory is read with [`eqx_bn.interop.read_orbax`][]. A file is told by
    its first bytes (and a `.safetensors` suffix): a zip archive or a pickle with
    [`eqx_bn.interop.read_torch`][] (which explains the pickles it refuses), a
    safetensors file with [`eqx_bn.interop.read_safetensors`][], anything else
    with [`eqx_bn.interop.read_msgpack`][]. The tree is returned as stored: a
    saved Flax `TrainState` gives `{"params": ..., "batch_stats": ..., "step":
    ..., "opt_state": ...}`, which [`eqx_bn.interop.load_flax`][] accepts; a
    PyTorch `state_dict` gives `{"layer1.0.bn1.running_var": ..., ...}`, which
    [`eqx_bn.interop.load_torch`][] accepts.

    **Arguments:**

    - `path`: the checkpoint file or directory.
    - `progress`: for a msgpack file, called as `progress(bytes_read, total)`.
    - `keys`: only these top-level entries, e.g. `["model"]` for a training
        checkpoint `{"model": state_dict, "args": ..., "epoch": 3}`; in a
        torch.save file, what the other entries hold is then not refused (see
        `read_torch`).

    **Returns:**

    Nested dicts of numpy arrays and scalars.

    **Raises:**

    - `CheckpointError`: `path` does not exist, or cannot be read (see the four
        readers: `read_orbax`, `read_torch`, `read_safetensors`, `read_msgpack`),
        or lacks one of `keys`.
    - `ImportError`: `path` is a directory and `orbax-checkpoint` is not installed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return select_entries(read_orbax(path), keys, f"checkpoint {path!r}")
    if not os.path.exists(path):
        raise CheckpointError(f"no such checkpoint file or directory: {path!r}")
    kind = checkpoint_kind(path)
    if kind == "torch":
        return read_torch(path, keys=keys)
    if kind == "safetensors":
        tree = read_safetensors(path)
    else:
        tree = read_msgpack(path, progress=progress)
    return select_entries(tree, keys, f"checkpoint {path!r}")
