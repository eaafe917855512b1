"""Flax checkpoints for Equinox models: read/write Flax's msgpack and Orbax formats,
and convert between Flax variables (linen) or state (NNX) and an `eqx_bn` model with
its `eqx.nn.State`.

Nothing here imports Flax.
"""

from .checkpoint import read_checkpoint as read_checkpoint
from .convert import (
    ConversionError as ConversionError,
    export_flax as export_flax,
    flax_paths as flax_paths,
    load_flax as load_flax,
)
from .errors import CheckpointError as CheckpointError
from .msgpack import (
    read_msgpack as read_msgpack,
    to_msgpack_bytes as to_msgpack_bytes,
    write_msgpack as write_msgpack,
)
from .nnx import export_nnx as export_nnx, nnx_paths as nnx_paths
from .orbax import read_orbax as read_orbax, write_orbax as write_orbax
