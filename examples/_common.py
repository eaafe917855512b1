"""What every example shares: the same command line (`--smoke`, `--out`), progress
that suits where the output goes, the runtime printed at the end, and the data
(scikit-learn's digits, which ship with it: the examples run offline).

Examples import it as `_common` (Python puts the script's folder on `sys.path`;
the tests put `examples/` there too).
"""

import argparse
import contextlib
import pathlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

DEFAULT_OUT = pathlib.Path("outputs")


def parser(doc: str, *, out_help: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every example takes.

    **Arguments:**

    - `doc`: the example's module docstring; its first line is the description.
    - `out_help`: what the example writes under `--out`.

    **Returns:**

    An `argparse.ArgumentParser` with `--smoke` and `--out`; add the example's own
    flags to it.
    """
    result = argparse.ArgumentParser(description=doc.splitlines()[0])
    result.add_argument(
        "--smoke", action="store_true", help="a few steps only (what the tests run)"
    )
    result.add_argument(
        "--out",
        type=pathlib.Path,
        default=DEFAULT_OUT,
        help=f"directory for {out_help} (default: ./{DEFAULT_OUT}, created if "
        "missing; git ignores it in this repository)",
    )
    return result


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class Progress:
    """A progress bar on a terminal; one line per epoch anywhere else (logs, CI).

    Use it as a context manager; call `step()` after each step and `epoch(...)` at
    the end of each epoch with the metrics to show.
    """

    def __init__(self, total: int, desc: str, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.interactive = self.stream.isatty()
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit="step",
            file=self.stream,
            disable=not self.interactive,
        )

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def epoch(self, epoch: int, epochs: int, **metrics: Any) -> None:
        """Shows the metrics after epoch `epoch` (counted from 1) of `epochs`."""
        if self.interactive:
            shown = {k: _format(v) for k, v in metrics.items()}
            self.bar.set_postfix(epoch=epoch, **shown)
        else:
            shown = ", ".join(f"{k} {_format(v)}" for k, v in metrics.items())
            print(f"epoch {epoch}/{epochs}: {shown}", file=sys.stdout, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


@contextlib.contextmanager
def runtime(name: str) -> Iterator[dict[str, float]]:
    """Prints `name: runtime X s` when the block ends, and fills `["seconds"]`."""
    timing: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield timing
    finally:
        timing["seconds"] = time.perf_counter() - start
        print(f"{name}: runtime {timing['seconds']:.1f} s", flush=True)


def save_figure(fig: Any, path: pathlib.Path) -> None:
    """Writes a Matplotlib figure to `path`, its folder made if needed; closes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt  # only the examples that plot need Matplotlib

    plt.close(fig)


def digits(
    train_limit: int | None = None, *, channels: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits (1797 grey 8x8 images, 10 classes), split 80/20 the same
    way in every example (stratified, fixed seed).

    **Arguments:**

    - `train_limit`: keep only this many training images (for `--smoke`).
    - `channels`: `"first"` for `(N, 1, 8, 8)` images, `"last"` for `(N, 8, 8, 1)`,
        `None` for `(N, 8, 8)`.

    **Returns:**

    `(x_train, y_train, x_test, y_test)`: float32 images in [0, 1] and int32
    labels; 1437 training and 360 held-out images.
    """
    axis = {None: None, "first": 1, "last": 3}[channels]
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        (data.images / 16.0).astype(np.float32),
        data.target.astype(np.int32),
        test_size=0.2,
        random_state=0,
        stratify=data.target,
    )
    if axis is not None:
        x_train, x_test = np.expand_dims(x_train, axis), np.expand_dims(x_test, axis)
    return x_train[:train_limit], y_train[:train_limit], x_test, y_test


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled, equally sized batches (the last partial one dropped,
    so that a jitted step is compiled once)."""
    order = rng.permutation(len(x))
    for i in range(len(x) // batch_size):
        idx = order[i * batch_size : (i + 1) * batch_size]
        yield x[idx], y[idx]
