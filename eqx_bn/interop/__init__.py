"""Flax and PyTorch checkpoints for Equinox models: read/write Flax's msgpack and
Orbax formats, `torch.save` files and safetensors, and convert between Flax variables
(linen), Flax NNX state or a PyTorch state_dict and an `eqx_bn` model with its
`eqx.nn.State`.

Nothing here imports Flax or torch.
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
from .safetensors import (
    read_safetensors as read_safetensors,
    to_safetensors_bytes as to_safetensors_bytes,
    write_safetensors as write_safetensors,
)
from .torch import read_torch as read_torch
from .torch_names import (
    export_torch as export_torch,
    load_torch as load_torch,
    torch_paths as torch_paths,
)
