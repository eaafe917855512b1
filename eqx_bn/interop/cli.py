"""`eqx-bn-convert` / `python -m eqx_bn.interop`: a Flax or PyTorch checkpoint -> an
Equinox file.

```
python -m eqx_bn.interop CHECKPOINT OUTPUT --model my_models:make_resnet
```

reads `CHECKPOINT` (a Flax msgpack file or an Orbax directory, holding linen
variables or NNX state; or a PyTorch `torch.save` / `.safetensors` state_dict),
builds the model and its State with `my_models.make_resnet()` (which returns
`(model, state)`, e.g. from `eqx.nn.make_with_state`), loads the checkpoint into
them with `eqx_bn.interop.load_flax` (or `load_torch`), and writes
`eqx.tree_serialise_leaves((model, state))` to `OUTPUT`. Read it back with

```python
model, state = eqx.tree_deserialise_leaves("OUTPUT", my_models.make_resnet())
```
"""

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax

from .engine import ConversionError
from .flax import load_flax
from .formats import CheckpointError, atomic_write, checkpoint_kind, read_checkpoint
from .torch import load_torch

# Files smaller than this are read without a progress bar: it would only flash.
_PROGRESS_MIN_BYTES = 64 * 2**20


class _UsageError(Exception):
    """A bad `--model` or output path: reported in one line, like the others."""


def _parser(prog: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Convert a Flax checkpoint (linen variables or NNX state, in a msgpack "
            "file or an Orbax directory) or a PyTorch state_dict (a torch.save or "
            ".safetensors file) into an Equinox model file written with "
            "eqx.tree_serialise_leaves. Load it with "
            "eqx.tree_deserialise_leaves(OUTPUT, factory())."
        ),
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="Flax msgpack file or Orbax directory, or PyTorch .pt/.safetensors file",
    )
    parser.add_argument("output", metavar="OUTPUT", help="the Equinox file to write")
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help=(
            "a function returning (model, state), e.g. my_models:make_resnet or "
            "path/to/models.py:make_resnet; it is called with no arguments"
        ),
    )
    parser.add_argument(
        "--key",
        metavar="NAME",
        help="convert the checkpoint's entry NAME, e.g. state_dict for a training "
        "checkpoint {'state_dict': ..., 'epoch': ...}",
    )
    parser.add_argument(
        "--ignore-extra",
        action="store_true",
        help="Flax only: skip entries other than params/batch_stats (step, "
        "opt_state, ... of a saved TrainState)",
    )
    parser.add_argument(
        "--cast",
        action="store_true",
        help="convert arrays whose dtype differs from the model's (e.g. bfloat16 "
        "into float32) instead of failing",
    )
    parser.add_argument(
        "--layout",
        choices=("auto", "linen", "nnx"),
        help="Flax only: linen variables or NNX state (nnx.state(model)); by "
        "default (auto) told apart by the checkpoint's names",
    )
    parser.add_argument(
        "--prefix",
        metavar="PREFIX",
        help="PyTorch only: read only the keys starting with PREFIX, without it "
        "(module. for a model saved inside nn.DataParallel)",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="print nothing but errors"
    )
    return parser


@contextlib.contextmanager
def _importable(directory: str) -> Iterator[None]:
    """`directory` first on `sys.path` while the factory's module is imported."""
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _import_module(name: str) -> Any:
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise _UsageError(f"--model: no such file {name!r}")
        module_name = os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(module_name, name)
        if spec is None or spec.loader is None:
            raise _UsageError(f"--model: cannot import {name!r}")
        module = importlib.util.module_from_spec(spec)
        # As `python path/to/models.py` would: its folder is where its own
        # `import helpers` finds the file's siblings.
        with _importable(os.path.dirname(os.path.abspath(name))):
            spec.loader.exec_module(module)
        return module
    try:
        # `python -m` puts the working directory on sys.path, an installed script
        # does not; `--model my_models:make` should work the same from both.
        with _importable(os.getcwd()):
            return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # Only a missing module named in --model is a usage error; an import that
        # fails inside the user's module is theirs to see, with its traceback.
        if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
            raise
        raise _UsageError(
            f"--model: no module named {e.name!r} (run from the directory that "
            "holds it, or give a path: path/to/models.py:factory)"
        ) from None


def _load_factory(spec: str) -> Callable[[], Any]:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise _UsageError(
            f"--model {spec!r}: expected MODULE:FACTORY, e.g. my_models:make_resnet"
        )
    factory: Any = _import_module(module_name)
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise _UsageError(f"--model {spec!r}: {module_name} has no {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise _UsageError(f"--model {spec!r}: {attr!r} is not callable")
    return factory


def _build(spec: str) -> tuple[eqx.Module, eqx.nn.State]:
    built = _load_factory(spec)()
    if not (
        isinstance(built, tuple)
        and len(built) == 2
        and isinstance(built[0], eqx.Module)
        and isinstance(built[1], eqx.nn.State)
    ):
        raise _UsageError(
            f"--model {spec!r} returned {type(built).__name__}, expected a tuple "
            "(model, state) of an eqx.Module and its eqx.nn.State, e.g. "
            "eqx.nn.make_with_state(MyModel)(..., key=key)"
        )
    return built


def _progress(path: str, quiet: bool) -> tuple[Callable[[int, int], None] | None, Any]:
    """A byte-progress callback for large files (tqdm, else plain lines) and what
    closes it."""
    if quiet or not os.path.isfile(path):
        return None, None
    # Only the msgpack reader reports progress: any other bar would stay at 0.
    if (
        os.path.getsize(path) < _PROGRESS_MIN_BYTES
        or checkpoint_kind(path) != "msgpack"
    ):
        return None, None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        bar = tqdm(
            total=os.path.getsize(path),
            unit="B",
            unit_scale=True,
            desc="reading",
            file=sys.stderr,
        )

        def update(done: int, total: int) -> None:
            bar.update(done - bar.n)

        return update, bar
    shown = [-1]

    def report(done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if tenth > shown[0]:
            shown[0] = tenth
            print(f"reading: {tenth * 10}% of {_size(total)}", file=sys.stderr)

    return report, None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def _check_flags(args: argparse.Namespace, is_torch: bool) -> None:
    """Refuses the flags that mean nothing for this kind of checkpoint, rather than
    ignore them: the user expects them to change something."""
    if not os.path.exists(args.checkpoint):
        return  # of no kind: read_checkpoint says it is missing
    if is_torch:
        given = [
            flag
            for flag, value in (
                ("--ignore-extra", args.ignore_extra),
                ("--layout", args.layout),
            )
            if value
        ]
        kind, other = "a PyTorch checkpoint", "Flax"
    else:
        given = ["--prefix"] if args.prefix is not None else []
        kind, other = "a Flax checkpoint", "PyTorch"
    if given:
        them = "them" if len(given) > 1 else "it"
        raise _UsageError(
            f"{' and '.join(given)}: only for {other} checkpoints, and "
            f"{args.checkpoint!r} is {kind}; leave {them} out."
        )


def _entry(variables: Any, key: str) -> Any:
    """The checkpoint's entry `key` (`--key`)."""
    if not isinstance(variables, Mapping) or key not in variables:
        names = ", ".join(map(repr, sorted(map(str, variables))))
        raise _UsageError(
            f"--key {key!r}: the checkpoint has no such entry; its top-level entries "
            f"are {names or 'none'}."
        )
    entry = variables[key]
    if not isinstance(entry, Mapping):
        raise _UsageError(
            f"--key {key!r}: that entry is a {type(entry).__name__}, expected a dict "
            "of arrays (a state_dict or Flax variables)."
        )
    return entry


def _check_output(args: argparse.Namespace) -> None:
    """Fails before the (possibly long) read if the output cannot be written, or
    would replace the checkpoint itself."""
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise _UsageError(f"cannot write {args.output!r}: no directory {directory!r}")
    if os.path.exists(args.output) and os.path.exists(args.checkpoint):
        same = os.path.samefile(args.output, args.checkpoint)
    else:
        same = os.path.realpath(args.output) == os.path.realpath(args.checkpoint)
    if same:
        raise _UsageError(
            f"OUTPUT {args.output!r} is the checkpoint being converted: writing it "
            "would replace the checkpoint. Give the Equinox file another name."
        )


def _convert(args: argparse.Namespace, say: Callable[[str], None]) -> None:
    _check_output(args)
    is_torch = (
        os.path.isfile(args.checkpoint)
        and checkpoint_kind(args.checkpoint) != "msgpack"
    )
    _check_flags(args, is_torch)
    model, state = _build(args.model)
    update, bar = _progress(args.checkpoint, args.quiet)
    # With --key, only that entry is read: what the others hold (a training
    # checkpoint's `args`, an argparse.Namespace) does not matter.
    keys = None if args.key is None else [args.key]
    try:
        variables = read_checkpoint(args.checkpoint, progress=update, keys=keys)
    except ImportError as e:  # an Orbax directory without orbax-checkpoint
        raise _UsageError(str(e)) from None
    finally:
        if bar is not None:
            bar.close()
    arrays = jax.tree.leaves(variables)
    say(
        f"read {args.checkpoint}: {len(arrays)} values, "
        f"{_size(sum(getattr(a, 'nbytes', 0) for a in arrays))}"
    )
    if args.key is not None:
        variables = _entry(variables, args.key)
    if is_torch:
        model, state = load_torch(
            model, state, variables, cast=args.cast, prefix=args.prefix or ""
        )
    else:
        model, state = load_flax(
            model,
            state,
            variables,
            strict=True,
            ignore_extra=args.ignore_extra,
            cast=args.cast,
            layout=args.layout or "auto",
        )
    say(f"loaded into {type(model).__name__}")
    try:
        with atomic_write(args.output) as f:
            eqx.tree_serialise_leaves(f, (model, state))
    except OSError as e:
        raise _UsageError(f"cannot write {args.output!r}: {e.strerror or e}") from None
    factory = args.model.rpartition(":")[2]
    say(
        f"wrote {args.output}; load it with "
        f"eqx.tree_deserialise_leaves({args.output!r}, {factory}())"
    )


def _flags(error: ConversionError) -> list[str]:
    """The flags that do what the error's hints advise (`ignore_extra=True`...)."""
    flags = []
    if error.extra:
        flags.append("`--ignore-extra`")
    if error.castable:
        flags.append("`--cast`")
    if error.prefix is not None:
        flags.append(f"`--prefix {error.prefix}`")
    if error.key is not None:
        flags.append(f"`--key {error.key}`")
    return flags


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Runs the converter; returns the exit status (0, or 2 on any error).

    **Arguments:**

    - `argv`: the arguments (default: `sys.argv[1:]`).
    - `prog`: the program name shown in messages.

    Errors in the checkpoint, in the conversion (`CheckpointError`,
    `ConversionError`) or in `--model` are printed as `PROG: error: ...` on stderr,
    without a traceback, and give exit status 2, as argparse does for bad usage.
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    try:
        _convert(args, say)
    except (CheckpointError, ConversionError, _UsageError) as e:
        message = str(e)
        flags = _flags(e) if isinstance(e, ConversionError) else []
        if flags:
            message += f"\nOn the command line, pass {' and '.join(flags)}."
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    return 0
