"""Orbax PyTree checkpoints (what `flax.training.checkpoints` writes by default).

`orbax-checkpoint` is an optional dependency (`pip install 'eqx_bn[orbax]'`),
imported only when one of these functions is called.
"""

import os
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

from ..._typing import typecheck
from .errors import CheckpointError

# Files in the directory of one Orbax PyTree checkpoint: `_METADATA` in Orbax since
# 2023, the single `checkpoint` msgpack file in older ones.
_MARKERS = ("_METADATA", "checkpoint")
_TMP_TAG = ".orbax-checkpoint-tmp"


def _import_orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            "reading or writing Orbax checkpoints needs the `orbax-checkpoint` "
            "package: `pip install 'eqx_bn[orbax]'` (or save the checkpoint in "
            "msgpack with `flax.serialization.to_bytes` and use `read_msgpack`)"
        ) from e
    return ocp


def _is_checkpoint(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, m)) for m in _MARKERS)


def _checkpoint_dir(directory: str) -> str:
    """`directory` itself, or the one checkpoint inside it (a `CheckpointManager`
    step directory holds its item in a sub-directory such as `default/`)."""
    if not os.path.exists(directory):
        raise CheckpointError(f"no such checkpoint directory: {directory!r}")
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{directory!r} is a file, but an Orbax checkpoint is a directory "
            "(use `read_msgpack` for a Flax msgpack file)"
        )
    if _TMP_TAG in os.path.basename(directory):
        raise CheckpointError(
            f"{directory!r} is an unfinished Orbax save (its name contains "
            f"{_TMP_TAG!r}); use a completed checkpoint"
        )
    if _is_checkpoint(directory):
        return directory
    inner = sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if _TMP_TAG not in name and _is_checkpoint(os.path.join(directory, name))
    )
    if len(inner) == 1:
        return inner[0]
    if inner:
        names = ", ".join(os.path.basename(p) for p in inner[:5])
        more = ", ..." if len(inner) > 5 else ""
        raise CheckpointError(
            f"{directory!r} holds several checkpoints ({names}{more}); pass one of them"
        )
    raise CheckpointError(
        f"{directory!r} is not an Orbax PyTree checkpoint: it has no _METADATA "
        "file. Pass the directory of one step, e.g. 'ckpts/checkpoint_10' or "
        "'ckpts/10/default'"
    )


def _scalar(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)) and value.shape == ():
        return value.item()
    return value


def _state_dict(node: Any) -> Any:
    # Orbax gives back lists where Flax saved tuples as {"0": ...} (an optimiser
    # state); store them as Flax's own `restore_checkpoint` returns them, and as the
    # msgpack format holds them, so that both formats read the same.
    if isinstance(node, dict):
        return {key: _state_dict(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return {str(i): _state_dict(value) for i, value in enumerate(node)}
    return node


@typecheck
def read_orbax(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads an Orbax PyTree checkpoint into numpy arrays.

    Reads what `flax.training.checkpoints.save_checkpoint` (Orbax by default),
    `orbax.checkpoint.PyTreeCheckpointer` or `StandardCheckpointer` saved, without a
    target: the tree's structure comes from the checkpoint's metadata. Arrays are
    restored on the host, whatever the sharding they were saved with.

    **Arguments:**

    - `directory`: the checkpoint's directory (e.g. `ckpts/checkpoint_10`), or a
        directory that holds exactly one (e.g. a `CheckpointManager` step
        directory `ckpts/10` holding `default/`).

    **Returns:**

    The tree as `flax.training.checkpoints.restore_checkpoint(directory, None)`
    gives it, but with numpy arrays (of the stored dtype) for all arrays: nested
    dicts with string keys, lists and tuples as `{"0": ..., "1": ...}` (as in the
    msgpack format), Python scalars for scalars saved as such (e.g. `step`).

    **Raises:**

    - `CheckpointError`: the directory is missing, is a file, holds no checkpoint
        or several, or its metadata or data cannot be read.
    - `ImportError`: `orbax-checkpoint` is not installed.
    """
    ocp = _import_orbax()
    path = _checkpoint_dir(os.path.abspath(os.fspath(directory)))
    checkpointer = ocp.PyTreeCheckpointer()
    # Orbax raises many types (OSError, ValueError, JSON and TensorStore errors);
    # all of them mean the same thing here.
    try:
        metadata = checkpointer.metadata(path)
    except Exception as e:
        raise CheckpointError(f"cannot read the Orbax metadata of {path!r}: {e}") from e
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if tree is None:
        raise CheckpointError(
            f"cannot read the Orbax metadata of {path!r}: its _METADATA file or "
            "array store is missing or corrupt"
        )
    array_type = ocp.metadata.ArrayMetadata
    scalar_type = ocp.metadata.ScalarMetadata  # a subclass of ArrayMetadata

    def restore_args(leaf: Any) -> Any:
        if isinstance(leaf, array_type):
            return ocp.RestoreArgs(restore_type=np.ndarray)
        return ocp.RestoreArgs()

    try:
        restored = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(restore_args, tree)),
        )
    except Exception as e:
        raise CheckpointError(f"cannot read the Orbax checkpoint {path!r}: {e}") from e
    # Orbax's own restore without arguments gives Python scalars for scalars saved
    # as such (a TrainState's `step`); keep that, with arrays as numpy.
    restored = jax.tree.map(
        lambda meta, value: _scalar(value) if isinstance(meta, scalar_type) else value,
        tree,
        restored,
        is_leaf=lambda x: x is None,
    )
    restored = _state_dict(restored)
    if not isinstance(restored, dict):
        raise CheckpointError(
            f"the Orbax checkpoint {path!r} holds a {type(restored).__name__} at the "
            "top level; expected a dict of variables"
        )
    return restored


@typecheck
def write_orbax(
    directory: str | os.PathLike, tree: PyTree, *, overwrite: bool = False
) -> None:
    """Saves `tree` as an Orbax PyTree checkpoint, as Flax's `save_checkpoint` does.

    Orbax writes into a temporary directory and renames it when complete, so an
    interrupted save leaves no checkpoint at `directory` (on local filesystems).

    **Arguments:**

    - `directory`: the checkpoint directory to create.
    - `tree`: a dict of numpy or JAX arrays and scalars.
    - `overwrite`: replace an existing `directory` (it is deleted first).

    **Raises:**

    - `FileExistsError`: `directory` exists and `overwrite` is false.
    - `ImportError`: `orbax-checkpoint` is not installed.
    """
    ocp = _import_orbax()
    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass `overwrite=True` to replace it")
    ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(tree), force=overwrite)
