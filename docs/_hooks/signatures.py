"""Readable, linked signatures in the API reference.

Used twice: as an MkDocs hook (`hooks:` in mkdocs.yml), whose `on_config` registers
`Signatures` below as a Griffe extension that runs after hippogriffe's; and so as
that extension (the hook also lets hippogriffe 0.2 run under Griffe 2).
hippogriffe writes every annotation and default as text (public names, jaxtyping
shapes); this extension then

- writes private paths as public ones (`equinox.nn._stateful.State` ->
  `equinox.nn.State`, for classes hippogriffe leaves alone);
- writes private paths as public ones (`equinox.nn._stateful.State` ->
  `equinox.nn.State`, for classes hippogriffe leaves alone);
- turns each annotation back into an expression whose names link to their API
  entry (`signature_crossrefs`): `TrainState` to `eqx_bn.train.TrainState`,
  `State` to the `equinox.nn.State` anchor of the `eqx_bn` page, ...;
- writes `Union[a, b, NoneType]` and `Optional[a]` as `a | b | None`;
- writes a default whose repr is not Python by a name: a function by its public
  path (`jax.nn.initializers.zeros`, not `<function zeros>`, which ruff cannot
  format), anything else (a sentinel `object()`) as `...`, as stubs do, rather
  than `<object object at 0x...>`, which changes every build;
- drops docstrings that are not the object's own: a class attribute `expansion = 1`
  inspected as the `int` it holds would show `int`'s docstring, and a NamedTuple
  field "Alias for field number 0".
"""

import ast
import builtins
import importlib
import inspect
import re

import griffe
from hippogriffe._extension import HippogriffeExtension
from mkdocs.plugins import event_priority

PACKAGE = "eqx_bn"
# hippogriffe writes each name as its public path. These link to their API entry,
# shown by their last part: eqx_bn's own names, and the Equinox names that the
# `eqx_bn` page anchors (it re-exports them).
LINKED = re.compile(r"^eqx_bn(\.\w+)+$|^equinox\.nn\.(State|StateIndex)$")
_NAMEDTUPLE_FIELD = re.compile(r"^Alias for field number \d+$")
_BUILTIN_DOCS = {
    t.__doc__
    for t in vars(builtins).values()
    if isinstance(t, type) and t.__doc__ is not None
}


# hippogriffe 0.2 listens for Griffe 1's `on_package_loaded`, which Griffe 2 calls
# `on_package`: without this it would never run.
if "on_package" not in vars(HippogriffeExtension):

    def _on_package(self, *, pkg, loader, **kwargs):
        self.on_package_loaded(pkg=pkg, loader=loader, **kwargs)

    HippogriffeExtension.on_package = _on_package


@event_priority(40)  # after hippogriffe (50) adds its extension, before mkdocstrings
def on_config(config):
    options = config.plugins["mkdocstrings"].config["handlers"]["python"]["options"]
    options["extensions"].append({f"{__file__}:Signatures": {}})
    return config


class _Readable(ast.NodeTransformer):
    """`Union[a, b]` -> `a | b`, `Optional[a]` -> `a | None`, `NoneType` -> `None`;
    `eqx_bn.train.TrainState` -> `TrainState`, remembered in `links` as a name to
    link to that path."""

    def __init__(self):
        self.links: dict[str, str] = {}

    def visit_Attribute(self, node):
        path = _public_path(ast.unparse(node))
        if not LINKED.match(path):
            return ast.parse(path, mode="eval").body
        prefix, name = path.rsplit(".", 1)
        self.links[name] = prefix
        return ast.Name(id=name)

    def visit_Subscript(self, node):
        self.generic_visit(node)
        name = getattr(node.value, "id", getattr(node.value, "attr", None))
        if name not in ("Union", "Optional"):
            return node
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if name == "Optional":
            args = [*args, ast.Constant(None)]
        out = args[0]
        for arg in args[1:]:
            out = ast.BinOp(left=out, op=ast.BitOr(), right=arg)
        return out

    def visit_Name(self, node):
        return ast.Constant(None) if node.id == "NoneType" else node


def _link_names(expr, targets: dict[str, str]) -> None:
    """Points every bare name in `targets` at `{targets[name]}.{name}`."""
    if isinstance(expr, griffe.ExprName):
        if expr.name in targets and not isinstance(expr.parent, griffe.ExprName):
            expr.parent = targets[expr.name]
        return
    if isinstance(expr, griffe.ExprAttribute):
        return  # a dotted path resolves by itself
    if isinstance(expr, griffe.Expr):
        for field in expr.__dataclass_fields__:
            _link_names(getattr(expr, field), targets)
    elif isinstance(expr, list | tuple):
        for item in expr:
            _link_names(item, targets)


def _expression(annotation, parent):
    if annotation is None:
        return None
    text = str(annotation)
    readable = _Readable()
    try:
        node = readable.visit(ast.parse(text, mode="eval")).body
    except SyntaxError:
        return text
    expr = griffe.safe_get_expression(node, parent=parent, parse_strings=False)
    if expr is None:
        return text
    _link_names(expr, readable.links)
    return expr


def _lookup(path: str):
    """The object at a dotted path, or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part, None)
        return obj
    return None


def _public_path(path: str) -> str:
    """`equinox.nn._stateful.State` -> `equinox.nn.State`: the path without its
    private parts, where that names the same object. (hippogriffe leaves the
    private path of classes that pretty-print themselves, as Equinox's do.)"""
    public = ".".join(p for p in path.split(".") if not p.startswith("_"))
    if public != path and (obj := _lookup(path)) is not None and _lookup(public) is obj:
        return public
    return path


def _default(text: str | None, value) -> str | None:
    """`text` if it reads as Python, else a name for `value`."""
    if text is None:
        return None
    try:
        ast.parse(text, mode="eval")
        return text
    except SyntaxError:
        pass
    if inspect.isroutine(value) or inspect.isclass(value):
        path = _public_path(f"{value.__module__}.{value.__name__}")
        return (
            path
            if not any(p.startswith("_") for p in path.split("."))
            else (value.__name__)
        )
    return "..."


def _walk(obj):
    for member in obj.members.values():
        if member.is_alias:
            continue
        yield member
        if member.is_class or member.is_module:
            yield from _walk(member)


class Signatures(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != PACKAGE:
            return
        objects = list(_walk(pkg))
        for obj in objects:
            if obj.docstring is not None and (
                obj.docstring.value in _BUILTIN_DOCS
                or _NAMEDTUPLE_FIELD.match(obj.docstring.value)
            ):
                obj.docstring = None
            if not obj.is_function:
                continue
            scope = obj.parent if obj.parent.is_module else obj.module
            signature = obj.extra["hippogriffe"].get("signature")
            for param in obj.parameters:
                param.annotation = _expression(param.annotation, scope)
                if signature is not None and param.name in signature.parameters:
                    value = signature.parameters[param.name].default
                    param.default = _default(param.default, value)
            obj.returns = _expression(obj.returns, scope)
