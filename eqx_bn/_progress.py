"""A progress bar for long loops of the library, shown only where someone watches."""

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, unit: str) -> Iterator[T]:
    """`items`, with a tqdm progress bar on standard error when it is a terminal.

    Nothing is printed into logs, notebooks' captured output or CI (standard error
    not a terminal), nor without tqdm installed (it is optional). tqdm's own
    `TQDM_DISABLE=1` environment variable turns the bar off on a terminal too. The
    bar counts `unit`s and knows the total when `items` has a length.
    """
    stream = sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield from items
        return
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with tqdm(total=total, desc=desc, unit=unit, file=stream) as bar:
        for item in items:
            yield item
            bar.update(1)
