"""A Griffe extension: the API reference documents what each package re-exports.

eqx_bn marks its public names the typing way, `from ._x import y as y`, with no
`__all__`, and Griffe treats every imported name as private. This extension makes
such a redundant alias public when it points inside eqx_bn, so that `::: eqx_bn.X`
entries (and a whole-module `::: eqx_bn.interop`) find it under its public path.
Re-exports of other libraries' objects (Equinox's `State`, ...) stay out: their
docstrings belong to, and cross-reference, those libraries' own documentation.
Other imported names (helpers such as `typecheck`) are dropped, which Griffe's
inspection (hippogriffe needs it) would otherwise show.
"""

import ast
import pathlib

import griffe

PACKAGE = "eqx_bn"


def _imports(path: pathlib.Path) -> tuple[set[str], set[str]]:
    """The names a module imports, and those of them it re-exports (`y as y`)."""
    imported, reexported = set(), set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for a in node.names:
                imported.add(a.asname or a.name.split(".")[0])
                if a.asname == a.name:
                    reexported.add(a.name)
    return imported, reexported


class PublicReexports(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name == PACKAGE:
            self._visit(pkg)

    def _visit(self, module: griffe.Module) -> None:
        imported, reexported = set(), set()
        if isinstance(module.filepath, pathlib.Path):
            imported, reexported = _imports(module.filepath)
        for name, member in list(module.members.items()):
            if member.is_alias and member.target_path.split(".")[0] != PACKAGE:
                del module.members[name]  # documented by its own library
            elif member.is_alias and member.is_module:
                pass  # a sub-package: it has its own page
            elif name in reexported:
                member.public = True
            elif name in imported:
                # A helper imported for use (`from ._typing import typecheck`).
                # Inspection may not see it as imported: the import statement says.
                del module.members[name]
        for sub in module.modules.values():
            if not sub.is_alias:
                self._visit(sub)
