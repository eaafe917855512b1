"""Flax and PyTorch checkpoints for Equinox models: read/write Flax's msgpack and
Orbax formats, `torch.save` files and safetensors, and convert between Flax variables
(linen), Flax NNX state or a PyTorch state_dict and an `eqx_bn` model with its
`eqx.nn.State`.

Nothing here imports Flax or torch. The layers, each importing only those below it:
`formats` (files <-> nested dicts of numpy arrays), `schemes` (the naming schemes as
data), `engine` (pairing, loading, exporting), and the front-ends `flax`, `nnx` and
`torch`.
"""

# Grouped by task, as in the API reference, not alphabetically.
# ruff: noqa: I001

# Load and export.
from .flax import (
    export_flax as export_flax,
    flax_paths as flax_paths,
    load_flax as load_flax,
)
from .nnx import export_nnx as export_nnx, nnx_paths as nnx_paths
from .torch import (
    export_torch as export_torch,
    load_torch as load_torch,
    torch_paths as torch_paths,
)

# Files.
from .formats import (
    read_checkpoint as read_checkpoint,
    read_msgpack as read_msgpack,
    read_orbax as read_orbax,
    read_safetensors as read_safetensors,
    read_torch as read_torch,
    to_msgpack_bytes as to_msgpack_bytes,
    to_safetensors_bytes as to_safetensors_bytes,
    write_msgpack as write_msgpack,
    write_orbax as write_orbax,
    write_safetensors as write_safetensors,
)

# Errors.
from .engine import ConversionError as ConversionError
from .formats import CheckpointError as CheckpointError

__all__ = [
    "CheckpointError",
    "ConversionError",
    "export_flax",
    "export_nnx",
    "export_torch",
    "flax_paths",
    "load_flax",
    "load_torch",
    "nnx_paths",
    "read_checkpoint",
    "read_msgpack",
    "read_orbax",
    "read_safetensors",
    "read_torch",
    "to_msgpack_bytes",
    "to_safetensors_bytes",
    "torch_paths",
    "write_msgpack",
    "write_orbax",
    "write_safetensors",
]
