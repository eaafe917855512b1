"""eqx_bn: Flax's BatchNorm, exactly, as an Equinox module with explicit State."""

import importlib.metadata

from equinox.nn import (
    State as State,
    StateIndex as StateIndex,
    inference_mode as inference_mode,
    make_with_state as make_with_state,
)

from . import interop as interop, models as models, train as train
from ._batch_norm import (
    BatchNorm as BatchNorm,
    CumulativeStats as CumulativeStats,
    RenormClipping as RenormClipping,
    RenormStats as RenormStats,
    RunningStats as RunningStats,
)
from ._fold import (
    FoldedBatchNorm as FoldedBatchNorm,
    fold_batch_norms as fold_batch_norms,
    freeze_batch_norms as freeze_batch_norms,
    trainable as trainable,
    unfreeze_batch_norms as unfreeze_batch_norms,
)
from ._recalibrate import recalibrate as recalibrate
from ._renorm import set_renorm_clipping as set_renorm_clipping
from ._typing import typecheck as typecheck

__all__ = [
    "BatchNorm",
    "CumulativeStats",
    "FoldedBatchNorm",
    "RenormClipping",
    "RenormStats",
    "RunningStats",
    "State",
    "StateIndex",
    "fold_batch_norms",
    "freeze_batch_norms",
    "inference_mode",
    "interop",
    "make_with_state",
    "models",
    "recalibrate",
    "set_renorm_clipping",
    "train",
    "trainable",
    "typecheck",
    "unfreeze_batch_norms",
]

try:
    __version__ = importlib.metadata.version("eqx_bn")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"
