"""What format a checkpoint file is in, told by its first bytes: for
`read_checkpoint`, which picks the reader, and for each reader, whose error for a
file in another format names that format and its reader.

Imports no reader (every reader imports this).
"""

import os
from typing import Literal

Kind = Literal["torch", "torch_legacy", "pickle", "safetensors", "msgpack"]

HEAD_BYTES = 9
"""How many leading bytes `kind_of` looks at."""

ZIP = b"PK\x03\x04"
"""How a zip archive starts: `torch.save`'s format since PyTorch 1.6."""

LEGACY_TORCH = b"\x80\x02\x8a"
"""How torch.save's legacy format starts: pickle protocol 2, then its magic number
as a LONG1."""

_PICKLE_PROTOCOLS = frozenset(b"\x02\x03\x04\x05")
# Flax's msgpack file is one map: a fixmap (0x80-0x8f), map 16 or map 32.
_MSGPACK_MAPS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}

_READ_WITH = (
    "read it with {} (or eqx_bn.interop.read_checkpoint, which tells the formats apart)"
)

FORMATS: dict[str, tuple[str, str]] = {
    "torch": (
        "a torch.save file (a zip archive)",
        _READ_WITH.format("eqx_bn.interop.read_torch"),
    ),
    "torch_legacy": (
        "a torch.save file in the legacy format (before PyTorch 1.6)",
        "eqx_bn.interop.read_torch says how to convert it",
    ),
    "pickle": (
        "a plain Python pickle (`pickle.dump`), not a torch.save file",
        "no reader here loads one, because unpickling runs the file's code: save "
        "it with torch.save or safetensors.torch.save_file instead",
    ),
    "safetensors": (
        "a safetensors file",
        _READ_WITH.format("eqx_bn.interop.read_safetensors"),
    ),
    "msgpack": (
        "a Flax msgpack checkpoint",
        _READ_WITH.format("eqx_bn.interop.read_msgpack"),
    ),
}
"""Each kind: what it is and what to do with it, in messages."""


def kind_of(head: bytes, size: int) -> Kind | None:
    """The format that a file's first `HEAD_BYTES` bytes show, or `None`.

    **Arguments:**

    - `head`: the file's first bytes (fewer if the file is shorter).
    - `size`: the file's size in bytes.

    **Returns:**

    `"torch"` (a zip archive), `"torch_legacy"`, `"pickle"` (another pickle),
    `"safetensors"` (a header length that fits the file, then `{`), `"msgpack"`
    (a msgpack map), or `None` for none of these.
    """
    if head[:4] == ZIP:
        return "torch"
    if head[:3] == LEGACY_TORCH:
        return "torch_legacy"
    # A pickle of protocol 2 or later. (`0x80` alone is also an empty msgpack map,
    # but a Flax file holding `{}` has nothing after it.)
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in _PICKLE_PROTOCOLS:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        if int.from_bytes(head[:8], "little") + 8 <= size:
            return "safetensors"
    if head[:1] and head[0] in _MSGPACK_MAPS:
        return "msgpack"
    return None


def file_kind(path: str) -> Kind | None:
    """`kind_of` a file's first bytes; `None` if it cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    return kind_of(head, size)


def checkpoint_kind(path: str) -> Literal["torch", "safetensors", "msgpack"]:
    """Which reader `read_checkpoint` gives a file: `torch`, `safetensors` or
    `msgpack`, by its `.safetensors` suffix, else its first bytes. Pickles go to
    `torch` (whose reader explains the legacy format and plain pickles); anything
    unknown to `msgpack`, whose reader says what is wrong."""
    if path.endswith(".safetensors") and file_kind(path) not in ("torch", "pickle"):
        return "safetensors"
    kind = file_kind(path)
    if kind in ("torch", "torch_legacy", "pickle"):
        return "torch"
    if kind == "safetensors":
        return "safetensors"
    return "msgpack"


def other_format(head: bytes, size: int, expected: Kind) -> str | None:
    """For a reader's error: `"it looks like <format>; read it with <reader>"`
    when the first bytes show a format other than `expected`, else `None`.

    **Arguments:**

    - `head`: the file's first bytes (at least `HEAD_BYTES` where it has them).
    - `size`: the file's size in bytes.
    - `expected`: the reader's own kind.
    """
    kind = kind_of(head, size)
    if kind is None or kind == expected:
        return None
    if expected == "torch" and kind == "torch_legacy":
        return None  # the torch reader explains it itself
    what, advice = FORMATS[kind]
    return f"it looks like {what}; {advice}"
