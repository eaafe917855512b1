"""eqx_bn: Flax's BatchNorm, exactly, as an Equinox module with explicit State."""

import importlib.metadata

from equinox.nn import (
    State as State,
    StateIndex as StateIndex,
    inference_mode as inference_mode,
    make_with_state as make_with_state,
)

from . import interop as interop, models as models, train as train
from ._batch_norm import BatchNorm as BatchNorm, RunningStats as RunningStats
from ._fold import (
    FoldedBatchNorm as FoldedBatchNorm,
    fold_batch_norms as fold_batch_norms,
)
from ._typing import typecheck as typecheck

__all__ = [
    "BatchNorm",
    "FoldedBatchNorm",
    "RunningStats",
    "State",
    "StateIndex",
    "fold_batch_norms",
    "inference_mode",
    "interop",
    "make_with_state",
    "models",
    "train",
    "typecheck",
]

try:
    __version__ = importlib.metadata.version("eqx_bn")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"
