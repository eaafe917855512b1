"""Ghost BatchNorm as tf_keras computes it (`tf_keras.layers.BatchNormalization(
virtual_batch_size=...)`, non-fused path), in NumPy, for the torch- and TF-free tests
of issue 24. `make_ghost_reference.py` checks it against tf_keras; the semantics, with
citations into tf_keras's source, are in `tests/data/REFERENCES.md`.

Channels last (`axis=-1`, tf_keras's default); any rank >= 2, batch axis first.
"""

import numpy as np


def ghost_groups(batch: int, virtual_batch_size: int) -> np.ndarray:
    """The virtual batch of each example: tf_keras reshapes the batch to
    `(virtual_batch_size, batch // virtual_batch_size, ...)` and reduces over the
    first axis, so example `n` joins group `n % (batch // virtual_batch_size)`."""
    if virtual_batch_size <= 0 or batch % virtual_batch_size:
        raise ValueError(f"{virtual_batch_size=} must divide {batch=}")
    return np.arange(batch) % (batch // virtual_batch_size)


def ghost_batch_norm(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    moving_mean: np.ndarray,
    moving_variance: np.ndarray,
    *,
    virtual_batch_size: int,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    training: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """**Arguments:**

    - `x`: `(batch, ..., channels)`.
    - `gamma`, `beta`, `moving_mean`, `moving_variance`: `(channels,)`.
    - `virtual_batch_size`: examples per virtual batch; must divide `batch` in
        training (inference takes any batch).
    - `momentum`, `epsilon`: as tf_keras's (defaults 0.99, 1e-3).
    - `training`: batch statistics per virtual batch and a moving-average update,
        or the moving statistics and no update.

    **Returns:**

    `(y, moving_mean, moving_variance)`, computed in `x`'s dtype.
    """
    dtype = x.dtype
    gamma, beta = gamma.astype(dtype), beta.astype(dtype)
    if not training:
        inv = gamma / np.sqrt(moving_variance.astype(dtype) + dtype.type(epsilon))
        y = x * inv + (beta - moving_mean.astype(dtype) * inv)
        return y, moving_mean, moving_variance
    groups = ghost_groups(x.shape[0], virtual_batch_size)
    n_groups = groups.max() + 1
    # (virtual_batch_size, n_groups, ...): row v, column g is example v*n_groups+g
    xr = x.reshape(virtual_batch_size, n_groups, *x.shape[1:])
    axes = (0, *range(2, xr.ndim - 1))  # all but the group and channel axes
    mean = xr.mean(axes, keepdims=True)
    var = np.mean(np.square(xr - mean), axes, keepdims=True)  # biased, two-pass
    inv = gamma / np.sqrt(var + dtype.type(epsilon))
    y = (xr * inv + (beta - mean * inv)).reshape(x.shape)
    # One update per step from the average over the virtual batches of their means
    # and of their (within-group, biased) variances.
    new_mean = mean.reshape(n_groups, -1).mean(0)
    new_var = var.reshape(n_groups, -1).mean(0)
    # tf.convert_to_tensor makes the Python float 1 - momentum a float32 tensor,
    # then casts it to the variables' dtype: float32 rounding even in float64.
    decay = dtype.type(np.float32(1.0 - momentum))
    moving_mean = moving_mean - (moving_mean - new_mean) * decay
    moving_variance = moving_variance - (moving_variance - new_var) * decay
    return y, moving_mean, moving_variance
