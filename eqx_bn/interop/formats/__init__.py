"""Checkpoint file formats, each to and from plain nested dicts of NumPy arrays:
Flax's msgpack, safetensors, `torch.save` files, Orbax directories; the sniffing
`read_checkpoint`; atomic writes; the shape check every reader shares; the one
`CheckpointError`.

Nothing here knows a naming scheme (linen, NNX, PyTorch) or an Equinox model.
"""

from .atomic import atomic_write as atomic_write
from .checkpoint import read_checkpoint as read_checkpoint
from .errors import CheckpointError as CheckpointError
from .msgpack import (
    ProgressCallback as ProgressCallback,
    read_msgpack as read_msgpack,
    to_msgpack_bytes as to_msgpack_bytes,
    write_msgpack as write_msgpack,
)
from .orbax import read_orbax as read_orbax, write_orbax as write_orbax
from .safetensors import (
    read_safetensors as read_safetensors,
    to_safetensors_bytes as to_safetensors_bytes,
    write_safetensors as write_safetensors,
)
from .sniff import checkpoint_kind as checkpoint_kind
from .torch_pickle import read_torch as read_torch
