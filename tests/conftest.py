"""Test-session settings: strict dtype and rank promotion, so that silent upcasts fail.

Flax's own code relies on standard promotion (e.g. bfloat16 - float32); calls into
Flax are wrapped in `flax_promotion()` from `tests/helpers.py`.

Two tiers. A bare `pytest` (the README's command) runs the quick tier: every test
not marked `slow`. The slow tier is what starts Python interpreters, runs the
documentation pages and the examples end to end, or trains full-size models;
`pytest -m slow` runs it, and `.ci/run` runs both tiers, one after the other.
Naming tests (paths, `-k`, `-m`) runs exactly those, slow or not.

Compiled programs persist between runs: JAX's persistent compilation cache is on, in
`.pytest_cache/jax-compilation-cache/` under the repository root, for every program
however quick to compile (most of the suite's time is XLA compiling small programs).
It is set through the environment before JAX is imported, so the interpreters that
tests start use it too. A `JAX_COMPILATION_CACHE_DIR` of your own takes precedence
(with JAX's own thresholds); `rm -rf .pytest_cache` empties it, and
`JAX_ENABLE_COMPILATION_CACHE=false` turns it off.
"""

import os
import pathlib
import sys

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

# Examples import their shared `_common` module from their own folder, as Python
# does when a script is run; tests that import an example need the same.
sys.path.insert(0, str(ROOT / "examples"))

# Kinds of test that are slow by nature: each puts its tests in the slow tier.
SLOW_KINDS = ("subprocess", "multidevice", "docs", "examples")


def _names_no_tests(config: pytest.Config) -> bool:
    """True for a bare `pytest [-n N]`: no paths, no `-k`, no `-m`."""
    return (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not config.option.keyword
        and not config.option.markexpr
    )


QUICK_TIER = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
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


@pytest.fixture
def key():
    return jax.random.key(0)
