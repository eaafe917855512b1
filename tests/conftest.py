"""Test-session settings: strict dtype and rank promotion, so that silent upcasts fail.

Flax's own code relies on standard promotion (e.g. bfloat16 - float32); calls into
Flax are wrapped in `flax_promotion()` from `tests/helpers.py`.

Two tiers. A bare `pytest` (the README's command) runs the quick tier: every test
not marked `slow`. The slow tier is what starts Python interpreters, runs the
documentation pages and the examples end to end, trains full-size models, or
compares with torch or keras as installed (`live`: the `test` extra installs
neither); `pytest -m slow` runs it, and `.ci/run` runs both tiers, one after the
other, the slow one in an environment with every extra.
Naming tests (paths, `-k`, `-m`) runs exactly those, slow or not.

Compiled programs persist between runs: JAX's persistent compilation cache is on, in
`.pytest_cache/jax-compilation-cache/` under the repository root, for every program
however quick to compile (most of the suite's time is XLA compiling small programs).
It is set through the environment before JAX is imported, so the interpreters that
tests start use it too. A `JAX_COMPILATION_CACHE_DIR` of your own takes precedence
(with JAX's own thresholds); `rm -rf .pytest_cache` empties it, and
`JAX_ENABLE_COMPILATION_CACHE=false` turns it off.

Under pytest-xdist (`-n`), the tests that share a module-scoped fixture run on one
worker, which builds it once (see `pytest_xdist_make_scheduler` below).
"""

import json
import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _compilation_cache() -> dict[str, str | float]:
    """JAX's settings for the compilation cache; none if the user has chosen one."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return {}
    cache = ROOT / ".pytest_cache" / "jax-compilation-cache"
    cache.mkdir(parents=True, exist_ok=True)  # also under `-p no:cacheprovider`
    return {
        "jax_compilation_cache_dir": str(cache),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }


COMPILATION_CACHE = _compilation_cache()
# Through the environment for the interpreters that tests start...
os.environ.update({name.upper(): str(v) for name, v in COMPILATION_CACHE.items()})

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# ...and in JAX's config for this one: a plugin (`pytest -p ...`) may have imported
# JAX before this file (JAX reads the environment when it is imported).
for name, value in COMPILATION_CACHE.items():
    jax.config.update(name, value)

# Hypothesis draws the same examples on every run, as its own "ci" profile does, so
# that their programs come from the compilation cache and a failure comes back on
# the next run; `pytest --hypothesis-profile=explore` draws new ones each run.
settings.register_profile("eqx_bn", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile("eqx_bn")

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# The tests draw their data, and Equinox's and Flax's layers their weights, with
# jax.random, eagerly and in hundreds of shapes: one XLA compile per shape. XLA:CPU
# compiles a draw with JAX's default "partitionable" threefry counters in about
# 1 s for a 4-d shape (`jax.random.normal(key, (16, 3, 8, 8))`), and with the
# original counters in 0.2 s, whatever the shape; in the quick tier that is about
# 30 s of the two workers' time. eqx_bn's own programs draw nothing with
# jax.random (its models draw their weights with NumPy), so only the drawn values
# change, not the programs under test. Set here only: the interpreters that tests
# start (the documentation pages, the examples) keep JAX's default, as users run
# them.
jax.config.update("jax_threefry_partitionable", False)

# Examples import their shared `_common` module from their own folder, as Python
# does when a script is run; tests that import an example need the same.
sys.path.insert(0, str(ROOT / "examples"))

# Kinds of test that are slow by nature: each puts its tests in the slow tier.
SLOW_KINDS = ("subprocess", "multidevice", "docs", "examples", "live")


def _names_no_tests(config: pytest.Config) -> bool:
    """True for a bare `pytest [-n N]`: no paths, no `-k`, no `-m`."""
    return (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not config.option.keyword
        and not config.option.markexpr
    )


QUICK_TIER = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    _start_groups(config)
    config.stash[QUICK_TIER] = _names_no_tests(config)
    if config.stash[QUICK_TIER]:
        config.option.markexpr = "not slow"


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.stash.get(QUICK_TIER, False):
        return "tier: quick (not slow); `pytest -m slow` runs the slow tier"
    return None


def pytest_itemcollected(item: pytest.Item) -> None:
    if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
        item.add_marker(pytest.mark.slow)


def _module_fixtures(item: pytest.Item) -> list[tuple]:
    """The instances of module-scoped fixtures that `item` uses, as keys: the ones
    it asks for (with their own fixtures), and the ones a fixture of it gets with
    `request.getfixturevalue(request.param)`, a parameter naming a fixture."""
    manager = item.session._fixturemanager
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec else {}
    names = [*item.fixturenames]
    names += [v for v in params.values() if isinstance(v, str) and v.isidentifier()]
    module = item.nodeid.split("::")[0]
    keys, seen = [], set()
    while names:
        name = names.pop()
        defs = manager.getfixturedefs(name, item) if name not in seen else None
        seen.add(name)
        if not defs:
            continue
        names += defs[-1].argnames
        if defs[-1].scope == "module":
            index = callspec.indices.get(name) if callspec else None
            keys.append((module, name, index))
    return sorted(keys, key=str)


def _groups(items: list[pytest.Item]) -> dict[str, str]:
    """`{nodeid: group}` for the tests that share an instance of a module-scoped
    fixture, directly or through another test's fixtures."""
    parent: dict = {}

    def root(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    first = {}
    for item in items:
        keys = _module_fixtures(item)
        for k in keys[1:]:
            parent[root(k)] = root(keys[0])
        if keys:
            first[item.nodeid] = keys[0]
    groups = {}
    for nodeid, k in first.items():
        module, name, index = root(k)
        param = "" if index is None else f"[{index}]"
        groups[nodeid] = f"fixture {module}::{name}{param}"
    return groups


# pytest-xdist, with `-n` (its "load" distribution), builds a module-scoped fixture (a
# trained model, reference outputs) in each worker that runs one of its tests. Here
# the tests that share one go to one worker, the largest groups first, and the
# fixture is built once: each worker writes `_groups` of its collection to a file
# that the controller's scheduler (xdist's "loadscope", by group) reads.
GROUPS_FILE = pytest.StashKey[pathlib.Path]()


def _start_groups(config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or config.getoption("dist", "no") != "load":
        return
    handle, name = tempfile.mkstemp(prefix="eqx_bn_xdist_groups_", suffix=".json")
    os.close(handle)
    config.stash[GROUPS_FILE] = pathlib.Path(name)


def pytest_unconfigure(config: pytest.Config) -> None:
    if GROUPS_FILE in config.stash:
        config.stash[GROUPS_FILE].unlink(missing_ok=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    if GROUPS_FILE in node.config.stash:
        node.workerinput["eqx_bn_groups"] = str(node.config.stash[GROUPS_FILE])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    path = getattr(config, "workerinput", {}).get("eqx_bn_groups")
    if path:
        try:
            groups = _groups(items)
        except Exception:  # pytest's internals changed: no groups, only slower
            groups = {}
        path = pathlib.Path(path)
        own = path.with_name(f"{path.name}.{config.workerinput['workerid']}")
        own.write_text(json.dumps(groups))
        own.replace(path)  # whole, before this worker reports its collection


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if GROUPS_FILE not in config.stash:
        return None
    from xdist.scheduler import LoadScopeScheduling

    path = config.stash[GROUPS_FILE]

    class SharedFixtureScheduling(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # first called when every worker has collected
                text = path.read_text()
                self.groups = json.loads(text) if text else {}
            return self.groups.get(nodeid, nodeid)

    return SharedFixtureScheduling(config, log)


@pytest.fixture
def key():
    return jax.random.key(0)
