"""The documentation runs as written: every ```python block of README.md and of the
pages under docs/, and the README's set-up commands are the ones CI runs.

Each page's blocks run in order in one fresh namespace, as a reader would paste
them into one session: under JAX's default (standard) dtype and rank promotion,
not the strict settings of this test session, in a temporary working directory.
A block that imports a package which is not installed (torch, say) skips the rest
of its page, naming the package. The site itself (`mkdocs build --strict`, which
checks every link and API reference) is built by `.ci/run`.
"""

import ast
import contextlib
import importlib.util
import pathlib
import re
import sys

import jax
import pytest

import eqx_bn

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# Pages: not the build's hooks, nor notes named `_*.md` (mkdocs.yml excludes both).
PAGES = [
    README,
    *sorted(
        p
        for p in DOCS.rglob("*.md")
        if "_hooks" not in p.parts and not p.name.startswith("_")
    ),
]

# A fence may be indented (inside a content tab or an admonition): the body is
# dedented by the fence's own indentation.
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n"
    r"(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.S | re.M,
)


def blocks(page: pathlib.Path, lang: str = "python") -> list[tuple[int, str]]:
    """The page's ```lang blocks as `(line number of the first code line, code)`."""
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        if m.group("lang") != lang:
            continue
        indent = len(m.group("indent"))
        lines = m.group("body").splitlines(keepends=True)
        code = "".join(line[indent:] if line.strip() else "\n" for line in lines)
        found.append((text.count("\n", 0, m.start("body")) + 1, code))
    return found


def missing_imports(code: str) -> list[str]:
    """Top-level packages that `code` imports and that are not installed."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


# Global JAX settings a page could change (`jax.config.update`) and so leak into the
# tests that run after it in the same process.
GUARDED_CONFIG = (
    "jax_enable_x64",
    "jax_numpy_dtype_promotion",
    "jax_numpy_rank_promotion",
    "jax_default_matmul_precision",
    "jax_default_prng_impl",
)


@contextlib.contextmanager
def restored_jax_config():
    saved = {name: getattr(jax.config, name) for name in GUARDED_CONFIG}
    try:
        yield
    finally:
        for name, value in saved.items():
            if getattr(jax.config, name) != value:
                jax.config.update(name, value)


def run_page(page: pathlib.Path) -> dict:
    """Runs the page's python blocks in order in one namespace, and returns it."""
    name = page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name
    namespace: dict = {"__name__": "__main__"}
    with restored_jax_config():
        _run_blocks(page, name, namespace)
    return namespace


def _run_blocks(page: pathlib.Path, name: str, namespace: dict) -> None:
    for line, code in blocks(page):
        missing = missing_imports(code)
        if missing:
            pytest.skip(
                f"{name}: the block at line {line} imports {', '.join(missing)}, "
                "which is not installed; that block and the rest of the page did "
                "not run"
            )
        # Padding puts tracebacks on the page's own line numbers.
        compiled = compile("\n" * (line - 1) + code, str(page), "exec")
        with (
            jax.numpy_dtype_promotion("standard"),
            jax.numpy_rank_promotion("allow"),
        ):
            exec(compiled, namespace)


def check_readme(namespace: dict) -> None:
    """The quick start trains one step and evaluates, as the README says."""
    y, y_eval, state = namespace["y"], namespace["y_eval"], namespace["state"]
    model = namespace["model"]
    assert y.shape == (16, 1) and y_eval.shape == (16, 1)
    # One training call moved the running variance away from its initial 1.
    assert float(state.get(model.norm.state_index).var[0]) != 1.0


CHECKS = {"README.md": check_readme}


@pytest.mark.docs
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_runs_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["docs"])
    namespace = run_page(page)
    check = CHECKS.get(page.relative_to(ROOT).as_posix())
    if check is not None:
        check(namespace)


def test_a_block_importing_a_missing_package_skips_the_rest_of_its_page(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 1\n```\n\n"
        "    ```python\n    import no_such_package_here.sub\n    ```\n\n"
        "```python\nraise AssertionError('must not run')\n```\n"
    )
    with pytest.raises(pytest.skip.Exception, match="no_such_package_here"):
        run_page(page)


def test_no_python_hides_behind_another_fence():
    """Only ```python blocks run: code fenced as ```py or ```python3 would not."""
    for page in PAGES:
        for fence in ("py", "python3"):
            assert not blocks(page, fence), f"{page.name}: use ```python, not {fence}"


def test_readme_has_the_two_setup_commands_ci_runs():
    """Two one-line set-up commands (the main job, the tests); `.ci/run` runs the
    README's test command verbatim."""
    setup = README.read_text().split("\n## ")[1]
    assert setup.startswith("Set-up")
    commands = re.findall(r"```bash\n(.*?)```", setup, flags=re.S)
    assert len(commands) == 2, commands
    assert all(c.count("\n") == 1 for c in commands), commands
    main_job, tests = (c.strip() for c in commands)
    assert "examples/digits_cnn.py" in main_job
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_page_is_in_the_nav_and_every_link_resolves():
    """mkdocs only reports a page missing from the nav; the README is not part of
    the site, so its links are checked here (against the files, or against the
    nav, whose pages `mkdocs build --strict` checks)."""
    config = (ROOT / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s*- (?:[^:\n]*: )?(\S+\.md)\s*$", config, flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in PAGES if p != README}
    assert pages <= nav, f"pages missing from mkdocs.yml's nav: {pages - nav}"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text()):
        if "://" in target:
            continue
        path = (ROOT / target).resolve()
        in_nav = path.is_relative_to(DOCS) and path.relative_to(DOCS).as_posix() in nav
        assert path.exists() or in_nav, f"README.md links to a missing {target}"


def test_api_reference_has_a_page_per_public_module():
    """Each public module has entries in the reference (`::: eqx_bn.train.X`);
    tests/test_site.py checks that every public name has exactly one."""
    modules = {
        f"eqx_bn.{name}"
        for name, value in vars(eqx_bn).items()
        if not name.startswith("_")
        and type(value) is type(eqx_bn)
        and value.__name__ == f"eqx_bn.{name}"
    }
    api = "".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    entries = re.findall(r"^::: (\S+)", api, flags=re.M)
    documented = {e.rsplit(".", 1)[0] for e in entries} | set(entries)
    assert modules | {"eqx_bn"} <= documented, modules - documented
