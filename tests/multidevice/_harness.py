"""Set-up shared by the multi-device check scripts (run in a subprocess).

Importing this module first gives the process 8 simulated CPU devices (the flag must
be set before JAX starts) and the test session's strict promotion settings. Each
script registers checks with `@check`; `run()` runs them all, keeps going after a
failure, and prints one JSON line `{"name": null | "traceback", ...}` last.
"""

import json
import os
import sys
import traceback
from collections.abc import Callable

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# tests/helpers.py (flax_promotion) lives one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N_DEVICES = 8
RESULT_PREFIX = "MULTIDEVICE-RESULTS "

_checks: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    """Registers `fn` under its name, without the `check_` prefix."""
    _checks[fn.__name__.removeprefix("check_")] = fn
    return fn


def close(actual, expected, rtol: float = 1e-5, what: str = "") -> None:
    """Equal at float32 rounding level, relative to the largest expected value.

    Sums over devices add in another order than on one device, so each element
    may differ by a few ulps of the array's scale, not of its own value.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=rtol * max(scale, 1.0), err_msg=what
    )


def tree_close(actual, expected, rtol: float = 1e-5, what: str = "") -> None:
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, (what, a_def, e_def)
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves, strict=True)):
        close(a, e, rtol, f"{what} leaf {i}")


def run() -> None:
    assert len(jax.devices()) == N_DEVICES, jax.devices()
    only = set(sys.argv[1:])
    results: dict[str, str | None] = {}
    for name, fn in _checks.items():
        if only and name not in only:
            continue
        try:
            fn()
            results[name] = None
        except Exception:  # reported to pytest, which fails the named check
            results[name] = traceback.format_exc()
        print(f"{name}: {'ok' if results[name] is None else 'FAILED'}", flush=True)
    print(RESULT_PREFIX + json.dumps(results), flush=True)
